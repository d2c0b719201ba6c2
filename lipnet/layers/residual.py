"""Linear residual convolution ``y = x + conv(x)``, bounded as the one convolution it is.

LiResNet (Hu, Zhang, Leino, Wang & Fredrikson, "Unlocking Deterministic Robustness Certification
on ImageNet", NeurIPS 2023; Hu et al., ICLR 2024) uses residual blocks without a nonlinearity on
the branch, ``x + conv(x)``. With 'same' padding the centre tap of the kernel reads the pixel
itself, never padding, so ``x + conv_K(x) = conv_{K + delta}(x)`` with ``delta`` the identity at the
centre tap: the block is a single convolution and its Lipschitz constant is the operator norm of
the merged kernel, which can be far below ``1 + ||conv_K||`` (the bound of a generic sum).

Differentiable sound normalisation. For zero padding (every input size) and circular padding
(every size) the operator norm is at most ``sup_w sigma_max(K(w))``, the sup over the torus of
the symbol ``K(w) = sum_t W_t exp(-i <t, w>)`` (:mod:`certify.rules.conv`, items 2 and 4). Let
``H(w) = K(w)^H K(w)`` (offsets ``|e_i| <= k_i - 1``), ``lambda* = max_w lambda_max(H(w))``
attained at ``w*`` with unit eigenvector ``v``. Every ``w*`` lies within ``h_i = pi / N_i`` per axis
of a point ``c`` of the ``N_1 x N_2`` DFT grid. ``phi(t) = v^H H(w* + t (c - w*)) v`` is a real
exponential sum with frequencies at most ``sigma = sum_i (k_i - 1) h_i`` in modulus, with values in
``[0, lambda*]`` and a maximum at ``t = 0``, so Bernstein's inequality gives
``|phi''| <= sigma^2 lambda* / 2`` and Taylor's formula ``lambda_max(H(c)) >= phi(1) >=
lambda* (1 - sigma^2 / 4)``. Hence, for ``sigma < 2``,

    sup_w sigma_max(K(w)) <= sqrt(max_grid lambda_max(H) / (1 - sigma^2 / 4)),

computed with ``rfft2`` (``H(-w)`` is the conjugate of ``H(w)``) and ``eigvalsh``
(:func:`symbol_norm_bound`, differentiable). This is the Fourier-domain power of the Gram symbol
used for convolutions by Delattre, Barthélemy, Araujo & Allauzen (ICML 2023), with a continuity
correction that makes the grid value an upper bound of the continuum.

In training the layer does not recompute it at every step: the merged kernel is divided by the
amortised bound of :class:`lipnet.layers.cpl.AmortisedSymbolBound`, ``s = s0 + delta`` with
``s0`` this grid bound at an anchor kernel ``M0`` (float64, no autograd) and ``delta`` the
reshaped-kernel bound of ``M - M0``; by the triangle inequality ``s`` bounds the merged operator
norm at every step, and the anchor moves to the current kernel (the grid bound is recomputed, in
float64, certified by Cholesky factorisations: :mod:`lipnet.layers.cpl`) whenever ``s`` exceeds
``1 + drift_tol`` times a first-order lower bound of the grid bound of the current kernel, so ``s``
is never more than ``1 + drift_tol`` times that grid bound.

Proofs: ``docs/proofs/convolutions.md#lemma-linear-residual`` and
``docs/proofs/frequency-bounds.md#lemma-grid-continuity``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from lipnet.layers.base import BoundedConv2d
from lipnet.layers.cpl import AmortisedSymbolBound
from lipnet.layers.parametrization import CachedParametrization, attach
from lipnet.layers.types import Device

__all__ = ["LinearResidualConv2d", "ResidualKernel", "symbol_norm_bound"]


def symbol_norm_bound(weight: Tensor, grid: int = 32) -> Tensor:
    """Differentiable upper bound of ``sup_w sigma_max(K(w))`` for a kernel ``(c_out, c_in, k_h, k_w)``.

    The bound of the module docstring on an ``grid x grid`` DFT grid; it bounds the operator norm
    of the stride-1, undilated convolution with zero padding (every size) or circular padding
    (every size). Exact in exact arithmetic up to the factor ``(1 - sigma^2 / 4)^(-1/2)``,
    ``sigma = pi (k_h + k_w - 2) / grid`` (1.02 for 3 x 3 kernels and ``grid = 32``).
    """
    kh, kw = weight.shape[-2:]
    sigma = math.pi * ((kh - 1) + (kw - 1)) / grid
    if sigma >= 2.0 or grid < max(kh, kw):
        raise ValueError(
            f"grid={grid} is too coarse for a {kh}x{kw} kernel: need grid > pi (k_h + k_w - 2) / 2"
        )
    symbol = torch.fft.rfft2(weight, s=(grid, grid)).permute(2, 3, 0, 1)
    gram = symbol.mH @ symbol if symbol.shape[-1] <= symbol.shape[-2] else symbol @ symbol.mH
    top = torch.linalg.eigvalsh(gram)[..., -1].max().clamp_min(0.0)
    return torch.sqrt(top / (1.0 - sigma * sigma / 4.0))


class ResidualKernel(CachedParametrization):
    """Parametrization ``weight = (W + delta) / s``: the merged kernel of ``x + conv_W(x)``.

    ``delta`` is the identity at the centre tap (per group). With ``normalize=True``, ``s`` is the
    amortised bound ``norm_bound(W + delta)`` (:class:`~lipnet.layers.cpl.AmortisedSymbolBound`,
    the grid bound on a ``grid x grid`` DFT grid at an anchor plus a drift bound), a sound upper
    bound of the merged operator norm (max over groups) for zero and circular padding at every
    step, so the layer is 1-Lipschitz; otherwise ``s = 1`` and ``weight_shape`` is not needed.
    Cached in eval mode.
    """

    def __init__(
        self,
        groups: int,
        normalize: bool,
        grid: int,
        *,
        weight_shape: tuple[int, int, int, int] | None = None,
        drift_tol: float = 0.02,
        drift_steps: int = 6,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.groups = groups
        self.normalize = normalize
        self.grid = grid
        self.norm_bound: AmortisedSymbolBound | None = None
        if normalize:
            if weight_shape is None:
                raise ValueError(
                    "ResidualKernel(normalize=True) needs the weight_shape of the bound's anchor"
                )
            self.norm_bound = AmortisedSymbolBound(
                weight_shape,
                groups=groups,
                grid=grid,
                drift_tol=drift_tol,
                drift_steps=drift_steps,
                device=device,
                dtype=dtype,
            )

    def compute(self, original: Tensor) -> Tensor:
        out, per_group, kh, kw = original.shape
        eye = torch.eye(per_group, dtype=original.dtype, device=original.device).repeat(self.groups, 1)
        merged = original.clone()
        merged[:, :, kh // 2, kw // 2] = merged[:, :, kh // 2, kw // 2] + eye
        if self.norm_bound is None:
            return merged
        return merged / self.norm_bound(merged)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, normalize={self.normalize}, grid={self.grid}"


class LinearResidualConv2d(BoundedConv2d):
    """LiResNet-style linear residual block ``y = x + conv(x) + bias``, as one merged convolution.

    An ``nn.Conv2d(channels, channels, kernel_size, padding='same')`` whose weight is parametrized
    by :class:`ResidualKernel`: ``weight = W + delta`` (``delta`` the identity at the centre tap), so
    ``y = conv_W(x) + x + bias`` exactly, computed by one convolution. ``lipschitz_bound()`` is
    ``certify.rules.conv.conv_operator_bound`` of the merged kernel (exact for circular padding
    and a known size, a sound all-size bound for zero padding), not ``1 + ||conv_W||``.

    Guarantee: none by construction when ``normalize=False`` (the bound tells the constant); with
    ``normalize=True`` the merged kernel is divided by a sound bound ``s`` of its operator norm
    (:class:`ResidualKernel`), so the block is 1-Lipschitz at every step: a contraction whose norm
    is at least ``1 / ((1 + drift_tol) g)`` (up to a relative ``1e-6``), ``g`` the grid correction
    (1.02 for 3 x 3 kernels and ``bound_grid=32``, 1.087 at 16). The grid bound costs
    ``bound_grid^2 / 2`` float64 Cholesky factorisations of ``c / groups``-sized complex matrices (and
    a few ``eigvalsh``) and runs only at the first call and when ``s`` is more than ``1 + drift_tol``
    times a lower bound of the current grid bound; every other training step costs one ``c x 9c``
    Gram matrix.
    The gradient of ``s`` is that of the grid bound at the anchor (see ``AmortisedSymbolBound``).
    Padding is zeros or circular; the kernel size must be odd (the centre tap must exist).
    Initialised with torch's default Conv2d initialisation of ``W``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        groups: int = 1,
        bias: bool = True,
        padding_mode: Literal["zeros", "circular"] = "zeros",
        normalize: bool = False,
        bound_grid: int = 32,
        drift_tol: float = 0.02,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(
                f"kernel_size must be a positive odd int (the identity sits at the centre tap), got "
                f"{kernel_size!r}"
            )
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(
                f"LinearResidualConv2d supports padding_mode 'zeros' or 'circular', got {padding_mode!r}: "
                "reflect and replicate padding read border pixels twice"
            )
        if not isinstance(channels, int) or channels < 1 or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"channels and groups must be positive ints, got {channels!r} and {groups!r}")
        if channels % groups:
            raise ValueError(f"groups={groups} must divide channels={channels}")
        super().__init__(
            channels,
            channels,
            kernel_size,
            1,
            kernel_size // 2,
            1,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        sigma = math.pi * 2 * (kernel_size - 1) / bound_grid
        if normalize and (sigma >= 2.0 or bound_grid < kernel_size):
            raise ValueError(
                f"bound_grid={bound_grid} is too coarse for kernel_size={kernel_size}: need "
                f"bound_grid > pi (kernel_size - 1) and >= kernel_size"
            )
        self.normalize = normalize
        kernel = ResidualKernel(
            groups,
            normalize,
            bound_grid,
            weight_shape=(channels, channels // groups, kernel_size, kernel_size),
            drift_tol=drift_tol,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        attach(self, kernel, (nn.Conv2d,))
