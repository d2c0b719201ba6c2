"""1-Lipschitz layers, one method a file, and the layer kinds that the model families take as ``conv=``.

Layers (each with ``lipschitz_bound()``, and ``export()`` where a plainer frozen form exists: all but
:class:`BatchCentering`, which stays as it is): :class:`AOLLinear` / :class:`AOLConv2d`
(:mod:`~lipnet.layers.aol`), :class:`BjorckLinear` / :class:`BjorckConv2d`
(:mod:`~lipnet.layers.bjorck`), :class:`OrthogonalLinear` (:mod:`~lipnet.layers.orthogonal`),
:class:`CayleyConv2d` (:mod:`~lipnet.layers.cayley`), :class:`BCOPConv2d` (:mod:`~lipnet.layers.bcop`),
:class:`AOCConv2d` (:mod:`~lipnet.layers.aoc`),
:class:`SLLLinear` / :class:`SLLConv2d` (:mod:`~lipnet.layers.sll`), :class:`CPLLinear` /
:class:`CPLConv2d` (:mod:`~lipnet.layers.cpl`), both on :class:`GradientStepBlock`
(:mod:`~lipnet.layers.gradient_step`), :class:`LinearResidualConv2d` (:mod:`~lipnet.layers.residual`),
:class:`BatchCentering` (:mod:`~lipnet.layers.centering`), :class:`RowNormLinear` (unit-norm rows, a
classifier head; :mod:`~lipnet.layers.rownorm`).

Functional attach, like :func:`torch.nn.utils.parametrizations.orthogonal`: :func:`aol`,
:func:`bjorck` (``nn.Linear`` or ``nn.Conv2d``) and :func:`orthogonal` (``nn.Linear``) constrain an
existing layer's weight and return the layer. The names ``lipnet.layers.aol``, ``.bjorck`` and
``.orthogonal`` are these functions; their modules are imported as ``from lipnet.layers.aol import
...`` (or ``importlib.import_module("lipnet.layers.aol")``). :func:`batch_weights` makes a model compute
all its Björck weights in a few batched calls per training forward (:mod:`~lipnet.layers.batching`).
"""

from lipnet.layers.aoc import AOCConv2d
from lipnet.layers.aol import AOLConv2d, AOLConvRescaling, AOLLinear, AOLRescaling, aol
from lipnet.layers.base import (
    BoundedConv2d,
    BoundedLinear,
    Exportable,
    InputSizeUnknownError,
    LipschitzBounded,
)
from lipnet.layers.batching import WeightBatcher, batch_weights
from lipnet.layers.bcop import BCOPConv2d, BlockOrthogonalKernel, bcop_kernel
from lipnet.layers.bjorck import (
    BjorckConv2d,
    BjorckLinear,
    BjorckOrthonormal,
    bjorck,
    bjorck_gram_transform,
    bjorck_orthonormalize,
    gram_norm_bound,
)
from lipnet.layers.cayley import CayleyConv2d, FourierConv2d
from lipnet.layers.centering import BatchCentering
from lipnet.layers.cpl import CPLConv2d, CPLLinear
from lipnet.layers.gradient_step import GradientStepBlock, PotentialStep
from lipnet.layers.kinds import (
    AUTO,
    AUTO_TAU_SPLIT,
    LayerKind,
    get_layer_kind,
    kind_for_tau,
    list_layer_kinds,
    register_layer_kind,
)
from lipnet.layers.orthogonal import OrthogonalLinear, orthogonal
from lipnet.layers.parametrization import CachedParametrization, EvalCache, EvalTensorCache
from lipnet.layers.patches import patch_multiplicity
from lipnet.layers.residual import LinearResidualConv2d
from lipnet.layers.rownorm import RowNormalization, RowNormLinear, row_normalize
from lipnet.layers.sll import SLLConv2d, SLLLinear

__all__ = [
    "AOCConv2d",
    "AOLConv2d",
    "AOLConvRescaling",
    "AOLLinear",
    "AOLRescaling",
    "AUTO",
    "AUTO_TAU_SPLIT",
    "BCOPConv2d",
    "BatchCentering",
    "BjorckConv2d",
    "BjorckLinear",
    "BjorckOrthonormal",
    "BlockOrthogonalKernel",
    "BoundedConv2d",
    "BoundedLinear",
    "CPLConv2d",
    "CPLLinear",
    "CachedParametrization",
    "CayleyConv2d",
    "EvalCache",
    "EvalTensorCache",
    "Exportable",
    "FourierConv2d",
    "GradientStepBlock",
    "InputSizeUnknownError",
    "LayerKind",
    "LinearResidualConv2d",
    "LipschitzBounded",
    "OrthogonalLinear",
    "PotentialStep",
    "RowNormLinear",
    "RowNormalization",
    "SLLConv2d",
    "SLLLinear",
    "WeightBatcher",
    "aol",
    "batch_weights",
    "bcop_kernel",
    "bjorck",
    "bjorck_gram_transform",
    "bjorck_orthonormalize",
    "get_layer_kind",
    "gram_norm_bound",
    "kind_for_tau",
    "list_layer_kinds",
    "orthogonal",
    "patch_multiplicity",
    "register_layer_kind",
    "row_normalize",
]
