"""1-Lipschitz linear and convolution layers (parametrizations of ``nn.Linear`` / ``nn.Conv2d``)."""

from lipnet.layers.aol import AOLConvRescaling, AOLRescaling
from lipnet.layers.bjorck import BjorckOrthonormal, bjorck_orthonormalize, gram_norm_bound
from lipnet.layers.centering import BatchCentering
from lipnet.layers.conv import AOLConv2d, BjorckConv2d
from lipnet.layers.linear import AOLLinear, BjorckLinear, OrthogonalLinear
from lipnet.layers.parametrization import CachedParametrization, EvalCache
from lipnet.layers.rko import patch_multiplicity

__all__ = [
    "AOLConv2d",
    "AOLConvRescaling",
    "AOLLinear",
    "AOLRescaling",
    "BatchCentering",
    "BjorckConv2d",
    "BjorckLinear",
    "BjorckOrthonormal",
    "CachedParametrization",
    "EvalCache",
    "OrthogonalLinear",
    "bjorck_orthonormalize",
    "gram_norm_bound",
    "patch_multiplicity",
]
