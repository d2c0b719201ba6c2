"""1-Lipschitz linear and convolution layers (parametrizations of ``nn.Linear`` / ``nn.Conv2d``)."""

from lipnet.layers.aoc import AOCConv2d
from lipnet.layers.aol import AOLConvRescaling, AOLRescaling
from lipnet.layers.bjorck import BjorckOrthonormal, bjorck_orthonormalize, gram_norm_bound
from lipnet.layers.cayley import CayleyConv2d
from lipnet.layers.centering import BatchCentering
from lipnet.layers.conv import AOLConv2d, BjorckConv2d
from lipnet.layers.cpl import CPLConv2d, CPLLinear
from lipnet.layers.linear import AOLLinear, BjorckLinear, OrthogonalLinear
from lipnet.layers.parametrization import CachedParametrization, EvalCache
from lipnet.layers.residual import LinearResidualConv2d
from lipnet.layers.rko import patch_multiplicity
from lipnet.layers.sll import SLLConv2d, SLLLinear

__all__ = [
    "AOCConv2d",
    "AOLConv2d",
    "AOLConvRescaling",
    "AOLLinear",
    "AOLRescaling",
    "BatchCentering",
    "BjorckConv2d",
    "BjorckLinear",
    "BjorckOrthonormal",
    "CPLConv2d",
    "CPLLinear",
    "CachedParametrization",
    "CayleyConv2d",
    "EvalCache",
    "LinearResidualConv2d",
    "OrthogonalLinear",
    "SLLConv2d",
    "SLLLinear",
    "bjorck_orthonormalize",
    "gram_norm_bound",
    "patch_multiplicity",
]
