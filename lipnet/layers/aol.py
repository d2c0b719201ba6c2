"""Almost-orthogonal layers (AOL): the rescaling, its functional attach :func:`aol`, and the layers.

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

The guarantee is 1-Lipschitz, not orthogonal: the rescaled weight is orthogonal only when the raw
one has orthogonal columns (input channels with disjoint autocorrelations, for a convolution).

Proof: ``docs/proofs/convolutions.md#lemma-aol``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnet.layers.base import BoundedConv2d, BoundedLinear
from lipnet.layers.parametrization import CachedParametrization, attach
from lipnet.layers.patches import padding_sides
from lipnet.layers.types import Device, Padding, PaddingMode, PlainLayer, Size2

__all__ = [
    "AOLConv2d",
    "AOLConvRescaling",
    "AOLLinear",
    "AOLRescaling",
    "aol",
    "aol_conv_scales",
    "aol_scales",
]


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


def _check_conv_padding(conv: nn.Conv2d) -> None:
    """Refuse the padding the AOL theorem does not cover (module docstring): it reads pixels twice."""
    if conv.padding_mode not in ("zeros", "circular"):
        raise ValueError(
            "AOL is 1-Lipschitz only with zero or circular padding, got "
            f"padding_mode={conv.padding_mode!r}: reflect and replicate padding read border pixels twice"
        )
    if conv.padding_mode == "circular":
        for dim in range(2):
            left, right = padding_sides(conv.padding, conv.kernel_size[dim], conv.dilation[dim], dim)
            if left + right > conv.dilation[dim] * (conv.kernel_size[dim] - 1):
                raise ValueError(
                    "AOL with circular padding needs total padding <= dilation * (kernel_size - 1)"
                    f" per dimension (otherwise outputs repeat), got padding={conv.padding} in dimension"
                    f" {dim}"
                )


def aol(module: PlainLayer) -> PlainLayer:
    """Constrain an existing ``nn.Linear`` or ``nn.Conv2d`` to be 1-Lipschitz by AOL rescaling; returns it.

    Registers :class:`AOLRescaling` (dense: ``weight = W diag(d)``, ``d_i = (sum_j |W^T W|_ij)^(-1/2)``)
    or :class:`AOLConvRescaling` (convolution: each input channel scaled by ``(sum_j sum_t
    |A_ij(t)|)^(-1/2)``, ``A`` the kernel autocorrelation, per group) on ``module.weight``, like
    :func:`torch.nn.utils.parametrizations.orthogonal` (Prach & Lampert, ECCV 2022, Theorem 1; proof in
    the module docstring). Guarantee: the layer is 1-Lipschitz for every raw weight, not orthogonal in
    general. A convolution must use zero padding, or circular padding that adds at most
    ``dilation * (kernel_size - 1)`` per dimension (``ValueError`` otherwise); any stride, dilation and
    groups. ``certify`` bounds the layer from the constrained weight, and :func:`lipnet.export`
    turns it into a plain layer holding that weight. No iteration, no change to the raw weight.
    """
    if isinstance(module, nn.Conv2d):
        _check_conv_padding(module)
        return attach(module, AOLConvRescaling(module.groups), (nn.Conv2d,))
    return attach(module, AOLRescaling(), (nn.Linear, nn.Conv2d))


class AOLLinear(BoundedLinear):
    """Dense layer with the almost-orthogonal rescaling of Prach & Lampert (ECCV 2022).

    ``weight = W diag(d)``, ``d_i = (sum_j |W^T W|_ij)^(-1/2)`` (on the smaller side of ``W``,
    see :class:`AOLRescaling`; attached by :func:`aol`): 1-Lipschitz for every raw ``W``, with no
    iteration. Not orthogonal in general (exactly orthogonal when ``W`` has orthogonal columns).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        aol(self)


class AOLConv2d(BoundedConv2d):
    """Almost-orthogonal convolution (Prach & Lampert, ECCV 2022): 1-Lipschitz, no iteration.

    Each input channel of the kernel is multiplied by ``d_i = (sum_j sum_t |A_ij(t)|)^(-1/2)``,
    ``A`` the kernel's autocorrelation (:class:`AOLConvRescaling`, attached by :func:`aol`). The
    theorem covers zero padding (any amount, any stride, dilation and groups) and circular padding
    that adds at most ``dilation * (k - 1)`` in total per dimension (no output beyond the input
    size); reflect and replicate padding read pixels twice and are refused. Initialised with an
    orthogonal centre tap and zeros elsewhere.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size2,
        stride: Size2 = 1,
        padding: Padding = 0,
        dilation: Size2 = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: PaddingMode = "zeros",
        *,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        centre = torch.empty(self.weight.shape[:2], device=self.weight.device, dtype=self.weight.dtype)
        nn.init.orthogonal_(centre)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, :, self.kernel_size[0] // 2, self.kernel_size[1] // 2] = centre
        aol(self)
