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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lipnet.layers import AOLConv2d, AOLLinear, BjorckConv2d, BjorckLinear

__all__ = ["LayerKind", "get_layer_kind", "list_layer_kinds", "register_layer_kind"]


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
        raise ValueError(
            f"unknown layer kind {name!r}; known kinds: {', '.join(list_layer_kinds())}"
        ) from None


def _same(kernel_size: int) -> int:
    if kernel_size % 2 != 1:
        raise ValueError(f"'same' convolutions need an odd kernel size, got {kernel_size}")
    return kernel_size // 2


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
