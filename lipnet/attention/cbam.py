"""Lipschitz-bounded CBAM: channel then spatial attention (Woo, Park, Lee & Kweon, ECCV 2018).

The original gates ``M_c(F) * F`` and ``M_s(F') * F'`` are not Lipschitz (the SE counterexample
applies to each). The bounded variant clamps ``F``; then ``|F'| <= B`` elementwise because
``M_c`` is in [0, 1], so the spatial stage needs no second clamp.

Proof: ``docs/proofs/attention.md#lemma-cbam``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from certify.rules.conv import conv_operator_bound
from lipnet.attention._bounds import (
    NormalizedModule,
    check_int,
    check_odd_kernel,
    check_positive,
    rescaled,
    sigmoid_gate_bound_tensor,
    soft_clamp,
    spectral_norm,
)

__all__ = ["CBAM"]


class CBAM(NormalizedModule):
    """CBAM with a soft-clamped input ``B tanh(F / B)``; average paths, max paths optional.

    Channel stage: ``F' = sigmoid(MLP(mean_hw F) [+ MLP(max_hw F)]) * B tanh(F / B)`` with
    ``MLP = W2 relu(W1 . + b1) + b2``. Blocks are channels (norm ``<= B sqrt(HW)``); the gate logits
    are ``||W1|| ||W2|| (1 / sqrt(HW) [+ 1])``-Lipschitz (a spatial max is 1-Lipschitz per channel
    and, unlike the mean, does not cancel the ``sqrt(HW)`` of the block norm). Lemma 1 gives
    ``L_c = 1 + B ||W1|| ||W2|| (1 [+ sqrt(HW)]) / 4`` (or its sigmoid refinement).

    Spatial stage: ``y = sigmoid(K * [mean_c F' [; max_c F']]) * F'`` with ``K`` a ``k x k``
    zero-padded convolution. Blocks are pixels (norm ``<= B sqrt(C)``); the per-pixel map
    ``F'_pixel -> (mean, max)`` is ``sqrt(1 / C [+ 1])``-Lipschitz, so
    ``L_s = 1 + B ||K|| sqrt(1 [+ C]) / 4`` (or refined), with ``||K||`` the sound operator-norm
    bound of :func:`certify.rules.conv.conv_operator_bound` (for the input size when known).

    Guarantee: ``L = L_c L_s``-Lipschitz on all of R^n. The average-only default is
    resolution-independent; with ``use_max=True`` the bound grows like ``sqrt(HW)``, so it needs
    the input size (``lipschitz_bound(None)`` is then ``inf`` unless ``normalize=True``). With
    ``normalize=True`` the output is divided by ``L`` for the actual input size: at most
    1-Lipschitz (up to the rounding of ``L`` to the module dtype).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        kernel_size: int = 7,
        clamp: float = 1.0,
        use_max: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_int("channels", channels)
        check_int("reduction", reduction)
        check_odd_kernel(kernel_size)
        if channels % reduction:
            raise ValueError(f"channels ({channels}) must be divisible by reduction ({reduction})")
        self.channels = channels
        self.clamp = check_positive("clamp", clamp)
        self.use_max = bool(use_max)
        self.normalize = bool(normalize)
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)
        self.spatial = nn.Conv2d(2 if use_max else 1, 1, kernel_size, padding=kernel_size // 2)

    def _mlp(self, z: Tensor) -> Tensor:
        return self.fc2(self.fc1(z).relu())

    def channel_gate(self, x: Tensor) -> Tensor:
        """``M_c(x)`` in [0, 1], shape ``(N, C)``."""
        logits = self._mlp(x.mean(dim=(2, 3)))
        if self.use_max:
            logits = logits + self._mlp(x.amax(dim=(2, 3)))
        return logits.sigmoid()

    def spatial_gate(self, f: Tensor) -> Tensor:
        """``M_s(F')`` in [0, 1], shape ``(N, 1, H, W)``."""
        pooled = f.mean(dim=1, keepdim=True)
        if self.use_max:
            pooled = torch.cat([pooled, f.amax(dim=1, keepdim=True)], dim=1)
        return self.spatial(pooled).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"CBAM expects (N, {self.channels}, H, W), got {tuple(x.shape)}")
        f = self.channel_gate(x)[:, :, None, None] * soft_clamp(x, self.clamp)
        y = self.spatial_gate(f) * f
        return self._normalized(y, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        if self.use_max and input_shape is None:
            # The max paths cost sqrt(H W): no finite constant holds for every input size.
            return self.fc1.weight.new_tensor(math.inf, dtype=torch.float64)
        mlp = spectral_norm(self.fc1.weight) * spectral_norm(self.fc2.weight)
        spatial_shape = None if input_shape is None else (self.spatial.in_channels, *input_shape[1:])
        conv = rescaled(
            conv_operator_bound(
                self.spatial.weight.detach(), padding=self.spatial.padding, input_shape=spatial_shape
            ),
            self.spatial.weight.to(torch.float64).norm(),
        )
        one = mlp.new_tensor(1.0)
        if self.use_max:
            assert input_shape is not None
            mlp = mlp * (1.0 + math.sqrt(input_shape[1] * input_shape[2]))
            conv = conv * math.sqrt(1.0 + self.channels)
        l_c = sigmoid_gate_bound_tensor(one, self.clamp * mlp)
        l_s = sigmoid_gate_bound_tensor(one, self.clamp * conv)
        return l_c * l_s

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, clamp={self.clamp}, use_max={self.use_max}, "
            f"normalize={self.normalize}"
        )
