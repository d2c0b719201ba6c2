"""Almost-orthogonal (AOL) rescaling of dense and convolution weights.

Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks",
ECCV 2022, Theorem 1: for any matrix ``P`` and ``d_i = (sum_j |P^T P|_ij)^(-1/2)``,
``||P diag(d)||_2 <= 1``. (Proof: ``diag(d) P^T P diag(d)`` has spectral norm at most 1 by the
Schur test with weights ``d^-1``.) Any smaller ``d_i`` keeps the bound, since
``P diag(d') = P diag(d) diag(d'/d)`` with ``d'/d <= 1``; this is how zero columns are handled.

For a convolution, ``P^T P`` is the (multi-channel) autocorrelation of the kernel: with full
zero padding its entry for input channels ``i, j`` at spatial shift ``t`` is
``A_ij(t) = sum_o sum_u K[o, i, u] K[o, j, u + t]``, so each row sum of ``|P^T P|`` is at most
``sum_j sum_t |A_ij(t)|``. Less zero padding, stride and dilation only drop outputs or spread
taps, and circular padding only aliases shifts together (``|sum| <= sum ||``), so the rescaled
convolution is 1-Lipschitz for zero padding of any size and for circular padding that adds no
output beyond the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lipnet.layers.parametrization import CachedParametrization

__all__ = ["AOLConvRescaling", "AOLRescaling", "aol_conv_scales", "aol_scales"]


def _inverse_sqrt(row_sums: Tensor) -> Tensor:
    # Clamping can only lower d_i (sound, see the module docstring); it turns the 0 * inf of an
    # all-zero column into 0 and keeps the derivative of rsqrt finite.
    return row_sums.clamp_min(torch.finfo(row_sums.dtype).eps ** 2).rsqrt()


def aol_scales(matrix: Tensor) -> Tensor:
    """``d_i = (sum_j |M^T M|_ij)^(-1/2)`` for the columns of ``matrix`` ``(m, n)``."""
    return _inverse_sqrt((matrix.mT @ matrix).abs().sum(dim=-1))


def aol_conv_scales(kernel: Tensor, groups: int = 1) -> Tensor:
    """Per-input-channel AOL scales of a convolution kernel ``(c_out, c_in / groups, k_h, k_w)``.

    Returns a tensor of shape ``(groups, c_in / groups)``: the scales of each group's input
    channels, from that group's kernel autocorrelation (groups share no channels).
    """
    c_out, c_in_g, kh, kw = kernel.shape
    if c_out % groups:
        raise ValueError(f"kernel has {c_out} output channels, not divisible by groups={groups}")
    c_out_g = c_out // groups
    per_group = kernel.reshape(groups, c_out_g, c_in_g, kh, kw)
    # Batch = input channel i, channels = (group, output channel o); weight rows = (group, j).
    signal = per_group.permute(2, 0, 1, 3, 4).reshape(c_in_g, groups * c_out_g, kh, kw)
    filters = per_group.permute(0, 2, 1, 3, 4).reshape(groups * c_in_g, c_out_g, kh, kw)
    autocorrelation = F.conv2d(signal, filters, padding=(kh - 1, kw - 1), groups=groups)
    # autocorrelation[i, (g, j), t] = sum_o sum_u K_g[o, i, u + t] K_g[o, j, u]
    row_sums = autocorrelation.abs().reshape(c_in_g, groups, -1).sum(dim=-1)
    return _inverse_sqrt(row_sums).mT


class AOLRescaling(CachedParametrization):
    """Parametrization ``weight = W diag(d)`` (AOL) of a dense weight ``W`` ``(out, in)``.

    The rescaling is applied on the smaller side of ``W``: to its columns as in the paper when
    ``in <= out``, otherwise to its rows (AOL applied to ``W^T``, i.e. ``diag(d) W`` with ``d``
    from ``W W^T``), which costs ``min(in, out)^2 max(in, out)`` instead of ``in^2 out``. Both
    give ``||weight||_2 <= 1`` (Prach & Lampert, ECCV 2022, Theorem 1).
    """

    def compute(self, original: Tensor) -> Tensor:
        if original.shape[1] <= original.shape[0]:
            return original * aol_scales(original)[None, :]
        return original * aol_scales(original.mT)[:, None]


class AOLConvRescaling(CachedParametrization):
    """Parametrization of a convolution kernel: each input channel scaled by its AOL factor.

    ``weight[o, i] = K[o, i] * d_i`` with ``d`` from :func:`aol_conv_scales`; the convolution
    with this kernel is 1-Lipschitz under zero padding and under circular padding that yields at
    most as many outputs as inputs (Prach & Lampert, ECCV 2022).
    """

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.groups = groups

    def compute(self, original: Tensor) -> Tensor:
        c_out, c_in_g, kh, kw = original.shape
        scales = aol_conv_scales(original, self.groups)
        per_group = original.reshape(self.groups, c_out // self.groups, c_in_g, kh, kw)
        return (per_group * scales[:, None, :, None, None]).reshape(original.shape)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"
