"""Björck orthonormalisation: the iteration, its parametrization, the attach :func:`bjorck`, the layers.

The Björck–Bowie iteration (Björck & Bowie, SIAM J. Numer. Anal. 1971; used for 1-Lipschitz
networks by Anil, Lucas & Grosse, ICML 2019) of order ``p`` is

    W <- (sum_{i=0}^{p} c_i (I - W W^T)^i) W,   c_i = binom(2i, i) / 4^i,

the order-``p`` Taylor truncation of ``(W W^T)^(-1/2) W``. Order 1 is ``W (3I - W^T W) / 2``.
On each singular value it acts as ``s -> s * sum_i c_i (1 - s^2)^i``, a truncation of
``s * (s^2)^(-1/2) = 1`` with positive terms, so every ``s`` in ``(0, 1]`` stays in ``(0, 1]``
and converges to 1 (with order ``p + 1``). The iteration therefore starts from the raw matrix
divided by a sound upper bound of its spectral norm (:func:`gram_norm_bound`), never from
a power-iteration estimate, which is a lower bound and can leave singular values above the
region of convergence.

A convolution is orthonormalised through its reshaped ``c_out x (c_in k_h k_w)`` kernel (RKO) and
scaled by ``1 / sqrt(C)``, ``C`` the patch multiplicity of :mod:`lipnet.layers.patches`, which makes
it 1-Lipschitz (not orthogonal) for its padding mode.

Proofs: ``docs/proofs/convolutions.md#lemma-bjorck``, ``#lemma-gram-iteration`` and
``#lemma-rko-multiplicity``.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor, nn

from lipnet.layers.base import BoundedConv2d, BoundedLinear
from lipnet.layers.parametrization import CachedParametrization, attach
from lipnet.layers.patches import patch_multiplicity

__all__ = [
    "BjorckConv2d",
    "BjorckLinear",
    "BjorckOrthonormal",
    "bjorck",
    "bjorck_orthonormalize",
    "gram_norm_bound",
]

Device = torch.device | str | None
Size2 = int | tuple[int, int]
Padding = str | int | tuple[int, int]
_Layer = TypeVar("_Layer", nn.Conv2d, nn.Linear)


def _gram(matrix: Tensor) -> Tensor:
    """The smaller Gram matrix of each matrix of a batch ``(..., m, n)``."""
    if matrix.shape[-2] <= matrix.shape[-1]:
        return matrix @ matrix.mT
    return matrix.mT @ matrix


def gram_norm_bound(gram: Tensor, steps: int = 2) -> Tensor:
    """Upper bound of the spectral norm of each symmetric PSD matrix of a batch ``(..., m, m)``.

    Gram iteration (Delattre, Barthélemy, Araujo & Allauzen, ICML 2023):
    ``||G||_2 = ||G^(2^t)||_2^(1 / 2^t) <= ||G^(2^t)||_F^(1 / 2^t)``, at most ``m^(1 / 2^(t+1))``
    times the true norm (``t = 0`` is the Frobenius norm). Each power is divided by its Frobenius
    norm before squaring and the scale is carried in log space, so nothing overflows. For
    ``G = W W^T`` this bounds ``||W||_2^2``.

    The bound holds in exact arithmetic; it pre-scales the Björck iteration and is not a
    certificate (certificates are computed in float64 by ``certify`` from the final weight).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    tiny = torch.finfo(gram.dtype).tiny
    power = gram
    log_scale = torch.zeros(gram.shape[:-2], dtype=gram.dtype, device=gram.device)
    for _ in range(steps):
        norm = torch.linalg.matrix_norm(power).clamp_min(tiny)
        power = power / norm[..., None, None]
        log_scale = 2.0 * (log_scale + norm.log())
        power = power @ power
    last = torch.linalg.matrix_norm(power).clamp_min(tiny)
    return torch.exp((log_scale + last.log()) / 2**steps)


def _polynomial(residual: Tensor, eye: Tensor, coeffs: list[float]) -> Tensor:
    """``sum_i c_i R^i`` by Horner's rule: ``c_0 I + R (c_1 I + R (c_2 I + ...))``."""
    poly = coeffs[-1] * residual + coeffs[-2] * eye
    for c in reversed(coeffs[:-2]):
        poly = c * eye + residual @ poly
    return poly


def _bjorck_direct(
    w: Tensor, gram: Tensor, eye: Tensor, coeffs: list[float], iterations: int, tol: float | None, wide: bool
) -> Tensor:
    """The Björck iteration on the pre-scaled matrix ``w`` itself; ``gram`` is its smaller Gram matrix."""
    for step in range(iterations):
        if step:
            gram = _gram(w)
        residual = eye - gram
        converged = tol is not None and bool(torch.linalg.matrix_norm(residual).max() <= tol)
        poly = _polynomial(residual, eye, coeffs)
        w = poly @ w if wide else w @ poly
        if converged:
            break
    return w


def bjorck_orthonormalize(
    matrix: Tensor,
    iterations: int,
    order: int = 1,
    tol: float | None = None,
    bound_steps: int = 2,
) -> Tensor:
    """Björck orthonormalisation of each matrix of a batch ``(..., m, n)``; differentiable.

    Orthonormalises the rows when ``m <= n`` and the columns otherwise. The matrix is first
    divided by the sound bound ``sqrt(gram_norm_bound(W W^T))`` of its spectral norm. Then every
    iterate is ``Q_k W`` with ``Q_k`` a polynomial in the Gram matrix ``G = W W^T``, so the
    iteration runs on ``m x m`` matrices only (``Q_{k+1} = P(G_k) Q_k``,
    ``G_{k+1} = P(G_k)^2 G_k``, all commuting) and touches the ``m x n`` matrix twice: to form
    ``G`` and to apply ``Q``. This is the Björck iteration exactly, in exact arithmetic.

    Runs ``iterations`` steps; with ``tol``, stops once ``||I - G_k||_F <= tol`` (after one more
    step, which takes the error to about ``tol^(order + 1)``) and ends with one Björck step on
    the product itself, which removes the rounding accumulated in the Gram-space recursion.

    Near-square matrices (larger side below 1.5 times the smaller) run the same iteration on the
    ``m x n`` iterate itself, ``W_{k+1} = P(I - W_k W_k^T) W_k``: a step then costs
    ``2 m^2 n + m^3`` multiply-adds instead of ``4 m^3`` (for a square matrix 11 products in 3
    steps instead of 13), the tolerance is checked on the actual iterate, and no final step is
    needed. Same iterates, pre-scaling and stopping rule in exact arithmetic.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    coeffs = [math.comb(2 * i, i) / 4**i for i in range(order + 1)]
    wide = matrix.shape[-2] <= matrix.shape[-1]
    gram = _gram(matrix)
    eye = torch.eye(gram.shape[-1], dtype=matrix.dtype, device=matrix.device)
    tiny = torch.finfo(matrix.dtype).tiny
    bound_sq = gram_norm_bound(gram, bound_steps).clamp_min(tiny)[..., None, None]
    gram = gram / bound_sq
    small, large = sorted(matrix.shape[-2:])
    if 2 * large < 3 * small:
        return _bjorck_direct(matrix / bound_sq.sqrt(), gram, eye, coeffs, iterations, tol, wide)
    transform = eye / bound_sq.sqrt()
    for step in range(iterations):
        residual = eye - gram
        converged = tol is not None and bool(torch.linalg.matrix_norm(residual).max() <= tol)
        poly = _polynomial(residual, eye, coeffs)
        # the first product with the scaled identity is a scaling, not a matrix product
        transform = poly * transform[..., :1, :1] if step == 0 else poly @ transform
        if converged or step == iterations - 1:
            break
        gram = poly @ (poly @ gram)
    w = transform @ matrix if wide else matrix @ transform
    if tol is not None:
        poly = _polynomial(eye - _gram(w), eye, coeffs)
        w = poly @ w if wide else w @ poly
    return w


class BjorckOrthonormal(CachedParametrization):
    """Parametrization ``weight = scale * Bjorck(W)`` per group (:func:`bjorck_orthonormalize`).

    The raw weight of shape ``(rows, ...)`` is viewed as ``groups`` matrices of shape
    ``(rows / groups, numel / rows)`` (the reshaped kernel of a grouped convolution). In training
    mode ``train_iterations`` steps of order ``order`` run in the weight's dtype, differentiated
    through. In eval mode the iteration runs in float64 until ``||I - Gram||_F <= eval_tol``
    (at most ``eval_max_iterations`` steps) and the result is cast back and cached.

    Guarantee (exact arithmetic): each group's matrix has singular values in ``[0, 1]``, times
    ``scale``; in eval mode, for a full-rank raw weight, they equal 1 (the orthonormal polar
    factor) to float64 precision before the cast. Layers report the norm of the actual weight.
    """

    def __init__(
        self,
        *,
        groups: int = 1,
        scale: float = 1.0,
        train_iterations: int = 3,
        order: int = 2,
        eval_max_iterations: int = 100,
        eval_tol: float = 1e-12,
        bound_steps: int = 2,
    ) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        if train_iterations < 1 or eval_max_iterations < 1:
            raise ValueError(
                f"iteration counts must be >= 1, got train_iterations={train_iterations}, "
                f"eval_max_iterations={eval_max_iterations}"
            )
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if not eval_tol > 0:
            raise ValueError(f"eval_tol must be > 0, got {eval_tol}")
        if bound_steps < 0:
            raise ValueError(f"bound_steps must be >= 0, got {bound_steps}")
        self.groups = groups
        self.scale = scale
        self.train_iterations = train_iterations
        self.order = order
        self.eval_max_iterations = eval_max_iterations
        self.eval_tol = eval_tol
        self.bound_steps = bound_steps

    def compute(self, original: Tensor) -> Tensor:
        rows = original.shape[0]
        if rows % self.groups:
            raise ValueError(f"weight has {rows} rows, not divisible by groups={self.groups}")
        w = original.reshape(self.groups, rows // self.groups, -1)
        if self.training:
            iterations, tol = self.train_iterations, None
        else:
            w = w.to(torch.float64)
            iterations, tol = self.eval_max_iterations, self.eval_tol
        w = bjorck_orthonormalize(w, iterations, self.order, tol, self.bound_steps)
        return (self.scale * w).to(original.dtype).reshape(original.shape)

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, scale={self.scale:.6g}, train_iterations={self.train_iterations}, "
            f"order={self.order}, eval_max_iterations={self.eval_max_iterations}, eval_tol={self.eval_tol:g}"
        )


def bjorck(
    module: _Layer,
    *,
    train_iterations: int = 3,
    order: int = 2,
    eval_max_iterations: int = 100,
    eval_tol: float = 1e-12,
) -> _Layer:
    """Constrain an existing ``nn.Linear`` or ``nn.Conv2d`` by Björck orthonormalisation; returns it.

    Registers :class:`BjorckOrthonormal` on ``module.weight``, like
    :func:`torch.nn.utils.parametrizations.orthogonal`: ``weight = scale * Bjorck(W / b)`` per group,
    ``b >= ||W||_2`` a Gram-iteration bound (Björck & Bowie 1971; Anil, Lucas & Grosse, ICML 2019;
    module docstring). The raw weight is kept; in eval mode the constrained one is its orthonormal
    polar factor, the nearest orthonormal matrix.

    Guarantee. Dense layer (``scale = 1``): 1-Lipschitz in both modes (every iterate is a contraction
    in exact arithmetic); in eval mode, for a full-rank raw weight, orthonormal rows
    (``out <= in``) or columns (``out > in``) to float64 precision before the cast to the layer's
    dtype, so orthogonal when square. Convolution: the reshaped kernel of each group is
    orthonormalised and ``scale = 1 / sqrt(C)`` with ``C`` the patch multiplicity for its kernel size,
    stride, dilation, padding and padding mode (:func:`~lipnet.layers.patches.patch_multiplicity`), so
    the convolution is 1-Lipschitz (RKO, not orthogonal: norm-preserving only when the stride equals
    the kernel size). In training mode ``train_iterations`` steps of order ``order`` run in the
    weight's dtype, differentiated through; in eval mode the iteration runs in float64 until
    ``||I - Gram||_F <= eval_tol`` (at most ``eval_max_iterations`` steps) and is cached. ``certify``
    bounds the layer from the constrained weight, and :func:`lipnet.export` turns it into a plain layer
    holding that weight.
    """
    groups, scale = 1, 1.0
    if isinstance(module, nn.Conv2d):
        groups = module.groups
        multiplicity = patch_multiplicity(
            module.kernel_size, module.stride, module.dilation, module.padding, module.padding_mode
        )
        scale = 1.0 / math.sqrt(multiplicity)
    orthonormal = BjorckOrthonormal(
        groups=groups,
        scale=scale,
        train_iterations=train_iterations,
        order=order,
        eval_max_iterations=eval_max_iterations,
        eval_tol=eval_tol,
    )
    return attach(module, orthonormal, (nn.Linear, nn.Conv2d))


class BjorckLinear(BoundedLinear):
    """Dense layer whose weight is the Björck orthonormalisation of a raw weight (attached by :func:`bjorck`).

    ``weight = Bjorck(W / b)`` with ``b >= ||W||_2`` a Gram-iteration bound (Björck & Bowie
    1971; Anil, Lucas & Grosse, ICML 2019), computed on the smaller Gram matrix, so non-square
    weights get orthonormal rows (``out <= in``) or columns (``out > in``). In training mode
    ``train_iterations`` steps of order ``order`` are differentiated through; in eval mode the
    iteration runs in float64 to convergence and is cached. Every iterate is a contraction in
    exact arithmetic (1-Lipschitz in both modes), and eval weights of full rank are orthonormal
    to float64 precision before the cast to the layer dtype. The raw weight is initialised
    orthogonal.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        train_iterations: int = 3,
        order: int = 2,
        eval_max_iterations: int = 100,
        eval_tol: float = 1e-12,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        nn.init.orthogonal_(self.weight)
        bjorck(
            self,
            train_iterations=train_iterations,
            order=order,
            eval_max_iterations=eval_max_iterations,
            eval_tol=eval_tol,
        )


class BjorckConv2d(BoundedConv2d):
    """Reshaped-kernel orthogonal (RKO) convolution, scaled to be 1-Lipschitz as configured.

    The ``c_out x (c_in k_h k_w)`` reshaped kernel of each group is orthonormalised by Björck
    iterations (:class:`BjorckOrthonormal`, sound pre-scaling, float64 convergence in eval; attached
    by :func:`bjorck`) and multiplied by ``1 / sqrt(C)``, where ``C`` is the largest number of
    times the convolution reads one input pixel for this kernel size, stride, dilation, padding
    and padding mode (:func:`~lipnet.layers.patches.patch_multiplicity`; ``C = k_h k_w`` for stride 1
    with zero padding, ``ceil(k/s)^2`` for stride ``s``; more under reflect, replicate or
    circular padding). Then ``||conv(x)||^2 <= ||M||^2 C ||x||^2 <= ||x||^2``: the layer is
    1-Lipschitz (contractive, not orthogonal: RKO is norm-preserving only when stride equals
    the kernel size), the idea of deel-torchlip's ``SpectralConv2d`` and orthogonium's
    ``RKOConv2d``, with the scale derived for the actual padding mode. The raw kernel is
    initialised orthogonal (as a reshaped matrix).
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
        padding_mode: str = "zeros",
        *,
        train_iterations: int = 3,
        order: int = 2,
        eval_max_iterations: int = 100,
        eval_tol: float = 1e-12,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        #: ``C``, the most times this convolution reads one input pixel (its scale is ``1 / sqrt(C)``).
        self.patch_multiplicity = patch_multiplicity(
            self.kernel_size, self.stride, self.dilation, self.padding, padding_mode
        )
        nn.init.orthogonal_(self.weight)
        bjorck(
            self,
            train_iterations=train_iterations,
            order=order,
            eval_max_iterations=eval_max_iterations,
            eval_tol=eval_tol,
        )
