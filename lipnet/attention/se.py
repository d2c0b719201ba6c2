"""Lipschitz-bounded squeeze-and-excitation (Hu, Shen & Sun, CVPR 2018).

The original ``y_c = sigmoid(W2 relu(W1 GAP(x)))_c * x_c`` is not Lipschitz on R^n: on inputs
whose channels have zero mean the gate is constant while ``x_c (grad s_c . v)`` grows linearly
with ``||x_c||``. The bounded variant clamps the multiplicand, which makes Lemma 1 applicable.

Proof: ``docs/proofs/attention.md#lemma-se``.
"""

from __future__ import annotations

from torch import Tensor, nn

from lipnet.attention._bounds import (
    NormalizedModule,
    check_int,
    check_positive,
    sigmoid_gate_bound_tensor,
    soft_clamp,
    spectral_norm,
)

__all__ = ["SqueezeExcitation"]


class SqueezeExcitation(NormalizedModule):
    """Squeeze-and-excitation with a soft-clamped multiplicand: ``y_c = s_c(x) * B tanh(x_c / B)``.

    ``s = sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2)`` (``W1``: C -> C / reduction). Blocks are
    channels: ``|s_c| <= 1``; the clamped channel has norm ``<= B sqrt(HW)``; the spatial mean is
    ``1 / sqrt(HW)``-Lipschitz per channel, so the gate logits are ``||W1|| ||W2|| / sqrt(HW)``-
    Lipschitz. Lemma 1 (and its sigmoid refinement, :mod:`lipnet.attention._bounds`) gives

        L = min(1 + B ||W1|| ||W2|| / 4, refined)

    for every resolution (the ``sqrt(HW)`` factors cancel), with exact float64 spectral norms.
    Guarantee: ``L``-Lipschitz on all of R^n; with ``normalize=True`` the output is divided by
    ``L`` and the module is at most 1-Lipschitz (up to the rounding of ``L`` to the module dtype).
    """

    def __init__(self, channels: int, reduction: int = 4, clamp: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        check_int("channels", channels)
        check_int("reduction", reduction)
        if channels % reduction:
            raise ValueError(f"channels ({channels}) must be divisible by reduction ({reduction})")
        self.channels = channels
        self.clamp = check_positive("clamp", clamp)
        self.normalize = bool(normalize)
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def gate(self, x: Tensor) -> Tensor:
        """The excitation ``s(x)`` in [0, 1], shape ``(N, C)``."""
        return self.fc2(self.fc1(x.mean(dim=(2, 3))).relu()).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SqueezeExcitation expects (N, {self.channels}, H, W), got {tuple(x.shape)}")
        y = self.gate(x)[:, :, None, None] * soft_clamp(x, self.clamp)
        return self._normalized(y, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        c = self.clamp * spectral_norm(self.fc1.weight) * spectral_norm(self.fc2.weight)
        return sigmoid_gate_bound_tensor(c.new_tensor(1.0), c)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, clamp={self.clamp}, normalize={self.normalize}"
