"""``sll_{small,medium,large,xlarge}``: the SLL networks of Araujo et al. (ICLR 2023)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lipnet.layers import SLLConv2d, SLLLinear
from lipnet.layers.kinds import get_layer_kind
from lipnet.models.lipconvnet import ChannelPad
from lipnet.models.registry import register_model
from lipnet.models.sequential import LipschitzSequential, linear_head
from lipnet.pooling import ScaledAvgPool2d

__all__ = ["SLLNet", "sll_large", "sll_medium", "sll_small", "sll_xlarge"]


class SLLNet(LipschitzSequential):
    """SLL network of Araujo, Havens, Delattre, Allauzen & Hu, "A Unified Algebraic Perspective on
    Lipschitz Neural Networks" (ICLR 2023).

    Layout (that of the authors' code): :class:`~lipnet.models.lipconvnet.ChannelPad` to ``width``
    channels; ``n_conv`` 3x3 :class:`~lipnet.layers.SLLConv2d` residual blocks with
    ``conv_inner`` inner channels; a 4x4 :class:`~lipnet.pooling.ScaledAvgPool2d` (the paper's
    ``AvgPool2d(4, divisor_override=4)``, i.e. window sums / 4); flatten to
    ``F = width (input_size / 4)^2`` features; ``n_dense`` :class:`~lipnet.layers.SLLLinear`
    blocks with ``dense_inner`` inner units; the linear head ``dense(F, num_classes)`` of the
    ``sll`` kind (AOL), the last child. The paper's head is a row-normalised linear layer
    certified with the last-layer rule, which is not 1-Lipschitz; the AOL head is, and ``certify``
    applies the same last-layer rule to it. ``conv_inner = 5`` follows the authors' training
    script (``--conv_inner_dim`` default).

    Guarantee: 1-Lipschitz (every child is; SLL blocks by Theorem 3 of the paper, checked from
    the actual weights by their ``lipschitz_bound``); ``lipschitz_bound`` is the product of the
    children's sound bounds.

    Sizes (``n_conv``, ``n_dense``, ``width``; ``dense_inner = 2048``): small (20, 7, 45), medium
    (30, 10, 60), large (50, 10, 90), xlarge (70, 15, 120). Reported on CIFAR-10 (clean /
    certified at 36/255): small 71.2 / 62.6, medium 72.2 / 64.3, large 72.7 / 65.0, xlarge
    73.3 / 65.8 (from memory of the paper's Table; not verified here). No config in
    ``experiments/configs/`` targets them yet.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        width: int = 45,
        n_conv: int = 20,
        n_dense: int = 7,
        conv_inner: int = 5,
        dense_inner: int = 2048,
    ) -> None:
        if not 1 <= in_channels <= width:
            raise ValueError(
                f"in_channels must be in [1, width={width}] (zero-padded to width), got {in_channels}"
            )
        if input_size < 4 or input_size % 4:
            raise ValueError(f"input_size must be a positive multiple of 4 (4x4 pooling), got {input_size}")
        if n_conv < 0 or n_dense < 0:
            raise ValueError(f"n_conv and n_dense must be >= 0, got {n_conv} and {n_dense}")
        if conv_inner < 1 or dense_inner < 1:
            raise ValueError(f"conv_inner and dense_inner must be >= 1, got {conv_inner} and {dense_inner}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        features = width * (input_size // 4) ** 2
        if features == num_classes:
            raise ValueError(f"the head needs width * (input_size / 4)^2 != num_classes, got {features}")
        super().__init__(
            ChannelPad(width),
            *(SLLConv2d(width, conv_inner, 3) for _ in range(n_conv)),
            ScaledAvgPool2d(4),
            nn.Flatten(),
            *(SLLLinear(features, dense_inner) for _ in range(n_dense)),
            linear_head(get_layer_kind("sll"), features, num_classes),
        )
        self.input_shape = (in_channels, input_size, input_size)


def _sized(size: str, width: int, n_conv: int, n_dense: int) -> Callable[..., SLLNet]:
    """Defines and registers ``sll_<size>``: :class:`SLLNet` with the paper's sizes for ``size``."""

    def constructor(in_channels: int = 3, num_classes: int = 10, input_size: int = 32) -> SLLNet:
        return SLLNet(in_channels, num_classes, input_size, width=width, n_conv=n_conv, n_dense=n_dense)

    # the registry and list_models() key on __name__; docs and repr read __qualname__ and __doc__
    constructor.__name__ = constructor.__qualname__ = f"sll_{size}"
    constructor.__doc__ = (
        f":class:`SLLNet` {size}: {n_conv} SLL convolutions of width {width}, "
        f"{n_dense} SLL dense blocks of 2048 units."
    )
    return register_model(constructor)


sll_small = _sized("small", width=45, n_conv=20, n_dense=7)
sll_medium = _sized("medium", width=60, n_conv=30, n_dense=10)
sll_large = _sized("large", width=90, n_conv=50, n_dense=10)
sll_xlarge = _sized("xlarge", width=120, n_conv=70, n_dense=15)
