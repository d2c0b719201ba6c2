"""Lipschitz-bounded residual attention (Wang et al., "Residual Attention Network", CVPR 2017).

The original ``H = (1 + M(x)) * T(x)`` is not Lipschitz (a product of two input-dependent maps)
and has gain up to 2 even where the mask is constant; its mask branch is not 1-Lipschitz either
(overlapping max-pooling and bilinear upsampling are 2-Lipschitz).

Proof: ``docs/proofs/attention.md#lemma-residual-attention``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lipnet.activations import MaxMin
from lipnet.attention._bounds import (
    NormalizedModule,
    check_maxmin_channels,
    check_positive,
    sigmoid_gate_bound_tensor,
    soft_clamp,
)
from lipnet.layers import BjorckConv2d
from lipnet.pooling import InvertibleDownsampling

__all__ = ["ResidualAttention"]


class ResidualAttention(NormalizedModule):
    """Residual attention ``y = (1 + sigmoid(m(x))) / 2 * B tanh(T(x) / B)`` with 1-Lipschitz branches.

    Trunk ``T = MaxMin(conv3x3(x))``. Mask logits from a one-level hourglass made of
    1-Lipschitz pieces: ``d = MaxMin(conv3x3(PixelUnshuffle_2(x)))`` (space-to-depth, orthogonal,
    instead of max-pooling), ``u = PixelShuffle_2(d)`` (orthogonal, instead of bilinear
    upsampling), the skip merged by averaging ``(x + u) / 2``, then ``m = conv1x1(.)``. All
    convolutions are :class:`~lipnet.layers.BjorckConv2d`, bounded from their actual kernels, so
    ``Lip(T) <= ||conv_T||`` and ``Lip(m) <= ||conv_1x1|| (1 + ||conv_down||) / 2``.

    Blocks are single elements (``|clamp| <= B``), the gate ``(1 + sigmoid) / 2`` is at most 1 with
    slope at most 1/8, so Lemma 1 gives ``L = Lip(T) + B Lip(m) / 8`` (or the sigmoid refinement of
    :mod:`lipnet.attention._bounds`, whichever is smaller). Guarantee: ``L``-Lipschitz on all of
    R^n; with ``normalize=True`` at most 1-Lipschitz (up to the rounding of ``L``). H and W must
    be even.
    """

    def __init__(self, channels: int, clamp: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        check_maxmin_channels("channels", channels)
        self.channels = channels
        self.clamp = check_positive("clamp", clamp)
        self.normalize = bool(normalize)
        self.trunk = BjorckConv2d(channels, channels, 3, padding=1)
        self.down = InvertibleDownsampling(2)
        self.mask_conv = BjorckConv2d(4 * channels, 4 * channels, 3, padding=1)
        self.up = nn.PixelShuffle(2)
        self.mask_out = BjorckConv2d(channels, channels, 1)
        self.act = MaxMin()

    def mask_logits(self, x: Tensor) -> Tensor:
        """The hourglass output ``m(x)``, shape ``(N, C, H, W)``."""
        up = self.up(self.act(self.mask_conv(self.down(x))))
        return self.mask_out((x + up) / 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(
                f"ResidualAttention expects (N, {self.channels}, H, W) with even H and W, "
                f"got {tuple(x.shape)}"
            )
        gate = (1.0 + self.mask_logits(x).sigmoid()) / 2
        y = gate * soft_clamp(self.act(self.trunk(x)), self.clamp)
        return self._normalized(y, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        down_shape = None
        if input_shape is not None:
            c, h, w = input_shape
            down_shape = (4 * c, h // 2, w // 2)
        trunk = self.trunk.lipschitz_bound(input_shape)
        mask = (
            self.mask_out.lipschitz_bound(input_shape)
            * (1.0 + self.mask_conv.lipschitz_bound(down_shape))
            / 2
        )
        a = torch.tensor(trunk, dtype=torch.float64)
        return sigmoid_gate_bound_tensor(a, a.new_tensor(self.clamp * mask), offset=0.5, slope=0.5)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, clamp={self.clamp}, normalize={self.normalize}"
