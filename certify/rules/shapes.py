"""Shape-only modules, and the per-axis size arguments of convolution and pooling rules.

The modules registered here move entries without changing them, so each is 1-Lipschitz (an
isometry or a permutation of coordinates): ``nn.Identity``, ``nn.Flatten``, ``nn.Unflatten``,
``nn.PixelShuffle``, ``nn.PixelUnshuffle``, ``nn.ChannelShuffle``; and ``nn.Dropout`` in eval mode,
where it is the identity (in training mode it is random and refused).

:func:`per_axis`, :func:`positive` and :func:`spatial_sizes` read torch's per-axis arguments
(``kernel_size=3`` or ``(3, 3)``) and per-sample input shapes the way the rules of
:mod:`certify.rules.conv` and :mod:`certify.rules.pooling` need them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from certify.contract import Shape, register_bound

__all__ = ["per_axis", "positive", "spatial_sizes"]


def per_axis(value: int | Sequence[int], nd: int, name: str) -> Shape:
    """``value`` (an int, or one int per axis, or one int for every axis) as ``nd`` ints."""
    if isinstance(value, int):
        values: Shape = (value,) * nd
    else:
        values = tuple(int(v) for v in value)
        if len(values) == 1 and nd > 1:
            values = values * nd
    if len(values) != nd:
        raise ValueError(f"{name} must be an int or a sequence of {nd} ints, got {value!r}")
    return values


def positive(values: Shape, name: str) -> Shape:
    """``values``, or ``ValueError`` naming ``name`` when one is below 1."""
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be >= 1, got {values}")
    return values


def spatial_sizes(input_shape: Sequence[int], nd: int, what: str) -> Shape:
    """The last ``nd`` entries of a per-sample input shape: its spatial sizes, each at least 1."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < nd or any(s < 1 for s in shape):
        raise ValueError(
            f"{what}: input_shape must end with {nd} positive spatial sizes, got {input_shape!r}"
        )
    return shape[-nd:]


def _one(module: nn.Module, input_shape: Shape | None) -> float:
    return 1.0


for _cls in (nn.Identity, nn.Flatten, nn.Unflatten, nn.PixelUnshuffle, nn.PixelShuffle, nn.ChannelShuffle):
    register_bound(_cls, _one)


@register_bound(nn.Dropout)
def _dropout(module: nn.Module, input_shape: Shape | None) -> float:
    if module.training:
        raise ValueError("Dropout in training mode is random; put the model in eval() before bounding it")
    return 1.0
