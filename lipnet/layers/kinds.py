"""Layer kinds: the one argument (``conv=``) that swaps the 1-Lipschitz layer inside a model family.

A :class:`LayerKind` builds the three layers a convolutional family needs:

* ``block(channels, kernel_size)``: a channel-preserving layer with 'same' spatial size (a plain
  convolution for Björck/AOL/Cayley, a residual block for SLL/CPL);
* ``conv(in_channels, out_channels, kernel_size)``: a channel-changing convolution with 'same' size
  (stems and the 1x1 convolution after a PixelUnshuffle downsampling);
* ``dense(in_features, out_features)``: a linear layer.

Kinds whose layers cannot change the number of channels (residual blocks) build their ``conv``
and ``dense`` layers from another kind, named in ``description``. Every layer the factories build
has ``lipschitz_bound()``.

A new kind is one :func:`register_layer_kind` call below (or in the user's code); the model families
take it by name through their ``conv=`` argument. A training config may name :data:`AUTO` instead: the
run takes :func:`kind_for_tau` of its loss's ``tau``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lipnet.layers.aoc import AOCConv2d
from lipnet.layers.aol import AOLConv2d, AOLLinear
from lipnet.layers.bcop import BCOPConv2d
from lipnet.layers.bjorck import BjorckConv2d, BjorckLinear
from lipnet.layers.cayley import CayleyConv2d
from lipnet.layers.cpl import CPLConv2d, CPLLinear
from lipnet.layers.sll import SLLConv2d, SLLLinear

__all__ = [
    "AUTO",
    "AUTO_TAU_SPLIT",
    "LayerKind",
    "get_layer_kind",
    "kind_for_tau",
    "list_layer_kinds",
    "register_layer_kind",
]

#: ``model.conv`` of a training config that leaves the kind to the loss's temperature (:func:`kind_for_tau`).
AUTO = "auto"
#: The temperature from which :func:`kind_for_tau` takes ``rko_bcop`` rather than ``bcop``.
AUTO_TAU_SPLIT = 10.0


@dataclass(frozen=True)
class LayerKind:
    """Factories of one layer kind; see the module docstring for what each builds."""

    name: str
    block: Callable[[int, int], nn.Module]
    conv: Callable[[int, int, int], nn.Module]
    dense: Callable[[int, int], nn.Module]
    description: str


_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Add ``kind`` under ``kind.name``; a name can be registered once."""
    if kind.name in _KINDS:
        raise ValueError(f"layer kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def list_layer_kinds() -> list[str]:
    """Names accepted by the ``conv=`` argument of the model families, sorted."""
    return sorted(_KINDS)


def get_layer_kind(name: str) -> LayerKind:
    """The registered kind ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return _KINDS[name]
    except KeyError:
        hint = f" ({AUTO!r} is resolved by a training config from loss.tau)" if name == AUTO else ""
        raise ValueError(
            f"unknown layer kind {name!r}{hint}; known kinds: {', '.join(list_layer_kinds())}"
        ) from None


def kind_for_tau(tau: float | None) -> str:
    """The kind a training config with ``model.conv: auto`` gets for a loss of temperature ``tau``.

    ``bcop`` (orthogonal convolutions) for ``tau < AUTO_TAU_SPLIT`` and for a loss without ``tau``;
    ``rko_bcop`` (contractive reshaped-kernel convolutions) from it, the accurate end. Measured on
    Fashion-MNIST, 60,000 images, three seeds (``docs/benchmarks.md``, "Householder activations at
    tau 5"): bcop leads at tau 0.1 to 1 and, with Householder activations (the Fashion-MNIST networks'
    ``activation`` for ``conv: auto`` from tau 1, :func:`lipnet.models.fmnist.activation_for_tau`), at
    tau 5, at 4 and at 20 epochs; rko_bcop at tau 10 to 100, at 4 epochs (with a row-normalised head
    from tau 50 for those networks, :func:`lipnet.models.fmnist.head_for_tau`).
    """
    return "bcop" if tau is None or tau < AUTO_TAU_SPLIT else "rko_bcop"


def _same(kernel_size: int) -> int:
    if kernel_size % 2 != 1:
        raise ValueError(f"'same' convolutions need an odd kernel size, got {kernel_size}")
    return kernel_size // 2


def _residual_or_aol(block: Callable[[int], nn.Module]) -> Callable[[int, int], nn.Module]:
    """Dense factory of a residual kind: ``block(n)`` for ``n -> n``, else ``AOLLinear``."""

    def dense(in_features: int, out_features: int) -> nn.Module:
        if in_features == out_features:
            return block(in_features)
        return AOLLinear(in_features, out_features)

    return dense


register_layer_kind(
    LayerKind(
        name="bjorck",
        block=lambda c, k: BjorckConv2d(c, c, k, padding=_same(k)),
        conv=lambda i, o, k: BjorckConv2d(i, o, k, padding=_same(k)),
        dense=BjorckLinear,
        description="reshaped-kernel Björck convolutions and Björck dense layers (1-Lipschitz)",
    )
)
register_layer_kind(
    LayerKind(
        name="aol",
        block=lambda c, k: AOLConv2d(c, c, k, padding=_same(k)),
        conv=lambda i, o, k: AOLConv2d(i, o, k, padding=_same(k)),
        dense=AOLLinear,
        description="AOL convolutions and dense layers (Prach & Lampert 2022; 1-Lipschitz)",
    )
)
# The orthogonal kinds take Björck dense layers (orthonormal in eval): torch's orthogonal map builds a
# matrix exponential of the larger side, which dominated training time with flattened features.
register_layer_kind(
    LayerKind(
        name="cayley",
        block=lambda c, k: CayleyConv2d(c, c, k),
        conv=lambda i, o, k: CayleyConv2d(i, o, k),
        dense=BjorckLinear,
        description=(
            "Cayley convolutions (Trockman & Kolter 2021; orthogonal, circular padding is part of the "
            "layer, input size fixed at the first forward) and Björck dense layers"
        ),
    )
)


def _settled_dense(in_features: int, out_features: int) -> nn.Module:
    """The dense layer of the ``bcop`` and ``rko_bcop`` kinds: Björck with a settled training weight
    (:func:`~lipnet.layers.bjorck.bjorck_settled`): 4 differentiated order-1 steps, up to 11 more settling
    it, the gradient gained 3/2 per settling step until one moves the weight by less than 1e-3 (the
    gradient of deel-torchlip's ``SpectralLinear``). Fashion-MNIST, 60k x 4 epochs, three seeds
    (docs/benchmarks.md "The accurate end"): under rko_bcop's convolutions +0.64 clean at tau 100 over 3
    order-2 steps, the gain being what helps (the settled value alone, a constant gain, does not); under
    BCOP's, +0.27 at tau 0.5 over 8 order-2 steps."""
    return BjorckLinear(in_features, out_features, train_iterations=4, order=1, settle_iterations=11)


register_layer_kind(
    LayerKind(
        name="bcop",
        block=lambda c, k: BCOPConv2d(c, c, k, padding=_same(k)),
        conv=lambda i, o, k: BCOPConv2d(i, o, k, padding=_same(k)),
        dense=_settled_dense,
        description=(
            "BCOP convolutions (Li et al. 2019; explicit kernel, orthogonal with circular padding, "
            "1-Lipschitz with zero padding) and Björck dense layers with a settled training weight "
            "(bjorck_settled; 1-Lipschitz in both modes)"
        ),
    )
)


def _rko_unless_degenerate(in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    """The ``rko_bcop`` kind's channel-changing convolution: RKO, or BCOP where RKO degenerates.

    An RKO layer with ``out_channels >= in_channels k^2`` orthonormalises the *columns* of its
    ``out x (in k^2)`` reshaped kernel ``W``; any two such ``W`` differ by an orthogonal ``Q`` on the
    left (``W_2 = Q W_1``), so the layer is one fixed patch embedding followed by a ``1 x 1`` rotation of
    its outputs: nothing spatial is learned. A grayscale stem (``1 -> 16``, ``3 x 3``) is such a layer.
    """
    padding = _same(kernel_size)
    if out_channels >= in_channels * kernel_size * kernel_size:
        return BCOPConv2d(in_channels, out_channels, kernel_size, padding=padding)
    return BjorckConv2d(in_channels, out_channels, kernel_size, padding=padding)


# Fashion-MNIST, 60k x 4 epochs (docs/benchmarks.md "One kind per end of the τ range"): the BCOP stem
# made the Björck kind better in every column at every tau of seed 0; against bcop it trades robustness
# for accuracy.
register_layer_kind(
    LayerKind(
        name="rko_bcop",
        block=lambda c, k: BjorckConv2d(c, c, k, padding=_same(k)),
        conv=_rko_unless_degenerate,
        dense=_settled_dense,
        description=(
            "reshaped-kernel Björck convolutions (1-Lipschitz, contractive) except where out_channels >= "
            "in_channels * k^2 (a grayscale or small stem), where RKO is a fixed patch embedding up to a "
            "rotation: BCOP there (orthogonal with circular padding); Björck dense layers with a settled "
            "training weight (bjorck_settled; 1-Lipschitz in both modes)"
        ),
    )
)
# AOCConv2d imports orthogonium when built, so registering the kind never needs it; building a
# layer without it raises an ImportError that says how to install it.
register_layer_kind(
    LayerKind(
        name="aoc",
        block=lambda c, k: AOCConv2d(c, c, k, padding=_same(k)),
        conv=lambda i, o, k: AOCConv2d(i, o, k, padding=_same(k)),
        dense=BjorckLinear,
        description=(
            "adaptive orthogonal convolutions (Boissin et al. 2025, through orthogonium; orthogonal with "
            "circular padding) and Björck dense layers"
        ),
    )
)
register_layer_kind(
    LayerKind(
        name="sll",
        block=lambda c, k: SLLConv2d(c, kernel_size=k),
        conv=lambda i, o, k: AOLConv2d(i, o, k, padding=_same(k)),
        dense=_residual_or_aol(SLLLinear),
        description=(
            "SLL residual blocks (Araujo et al. 2023; 1-Lipschitz); residual blocks cannot change the "
            "number of channels or features, so channel-changing convolutions are AOLConv2d and dense "
            "layers with in != out are AOLLinear"
        ),
    )
)
register_layer_kind(
    LayerKind(
        name="cpl",
        block=lambda c, k: CPLConv2d(c, kernel_size=k),
        conv=lambda i, o, k: AOLConv2d(i, o, k, padding=_same(k)),
        dense=_residual_or_aol(CPLLinear),
        description=(
            "convex potential layers (Meunier et al. 2022; 1-Lipschitz, sound step size); residual blocks "
            "cannot change the number of channels or features, so channel-changing convolutions are "
            "AOLConv2d and dense layers with in != out are AOLLinear"
        ),
    )
)
