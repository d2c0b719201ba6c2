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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lipnet.layers.base import BoundedConv2d, BoundedLinear
from lipnet.layers.parametrization import CachedParametrization, attach, full_precision
from lipnet.layers.patches import patch_multiplicity
from lipnet.layers.types import Device, Padding, PaddingMode, PlainLayer, Size2

if TYPE_CHECKING:
    from lipnet.layers.batching import WeightBatcher

__all__ = [
    "BjorckConv2d",
    "BjorckLinear",
    "BjorckOrthonormal",
    "bjorck",
    "bjorck_gram_transform",
    "bjorck_orthonormalize",
    "bjorck_settled",
    "gram_norm_bound",
]


def _frobenius(matrix: Tensor) -> Tensor:
    """Frobenius norm of each matrix of a batch ``(..., m, n)`` (one kernel, no reshapes)."""
    return torch.linalg.vector_norm(matrix, dim=(-2, -1))


def _square(matrix: Tensor) -> Tensor:
    """``matrix @ matrix`` (one ``bmm`` for a batch of matrices, with no reshapes)."""
    return torch.bmm(matrix, matrix) if matrix.ndim == 3 else matrix @ matrix


def gram_norm_bound(gram: Tensor, steps: int = 2) -> Tensor:
    """Upper bound of the spectral norm of each symmetric PSD matrix of a batch ``(..., m, m)``.

    Gram iteration (Delattre, Barthélemy, Araujo & Allauzen, ICML 2023):
    ``||G||_2 = ||G^(2^t)||_2^(1 / 2^t) <= ||G^(2^t)||_F^(1 / 2^t)``, at most ``m^(1 / 2^(t+1))``
    times the true norm (``t = 0`` is the Frobenius norm). For ``G = W W^T`` this bounds ``||W||_2^2``.

    Computed as ``c_0 c_2^(1/4) c_4^(1/16) ... (||X_t||_F + tiny)^(1 / 2^t)``: ``G`` is divided by
    ``c_0 = ||G||_F + tiny``, and the power ``X_k`` is divided again by ``c_k = ||X_k||_F + tiny`` before
    every second squaring (``k = 2, 4, ...``), so that the largest eigenvalue stays in ``[m^-2, 1]``
    between two divisions (a unit Frobenius norm puts it in ``[m^(-1/2), 1]``): nothing overflows and,
    for ``m < 10^9`` in float32 or float64, nothing that carries the bound underflows; ``t <= 2`` needs
    one division. The value is ``||G^(2^t)||_F^(1 / 2^t)`` whatever the ``c_k > 0`` (it is positively
    homogeneous of degree 1 in each rescaled power), so they are constants of the autograd graph and the
    gradient is that of ``||G^(2^t)||_F^(1 / 2^t)``
    (``docs/proofs/convolutions.md#lemma-gram-iteration``).

    The bound holds in exact arithmetic; it pre-scales the Björck iteration and is not a
    certificate (certificates are computed in float64 by ``certify`` from the final weight).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return _frobenius(gram)
    tiny = torch.finfo(gram.dtype).tiny
    scale = _frobenius(gram.detach()) + tiny
    power = gram / scale[..., None, None]
    for k in range(steps):
        if k and k % 2 == 0:
            renorm = _frobenius(power.detach()) + tiny
            power = power / renorm[..., None, None]
            scale = scale * renorm ** (1.0 / 2**k)
        power = _square(power)
    # + tiny: an upper bound stays one, and the root's derivative stays finite at a zero matrix
    return scale * (_frobenius(power) + tiny) ** (1.0 / 2**steps)


def _monomial_coefficients(order: int) -> list[float]:
    """``a_j`` with ``sum_{i<=p} c_i (1 - x)^i = sum_j a_j x^j``, ``c_i = binom(2i, i) / 4^i``.

    Dyadic rationals, so exact in binary floating point (order 2: ``15/8 - 5/4 x + 3/8 x^2``).
    """
    taylor = [math.comb(2 * i, i) / 4**i for i in range(order + 1)]
    return [
        (-1) ** j * sum(c * math.comb(i, j) for i, c in enumerate(taylor) if i >= j) for j in range(order + 1)
    ]


def _identities(size: int, coeffs: list[float], like: Tensor) -> tuple[Tensor, Tensor]:
    """``I`` and ``a_(p-1) I`` of side ``size``, the constants of :func:`_polynomial`."""
    eye = torch.eye(size, dtype=like.dtype, device=like.device)
    return eye, eye * coeffs[-2]


def _polynomial(
    x: Tensor, eye: Tensor, scaled_eye: Tensor, coeffs: list[float], horner: list[Tensor] | None = None
) -> Tensor:
    """``sum_j a_j X^j`` for a batch ``X`` ``(E, m, m)`` by Horner's rule, one kernel per degree:
    ``H_(p-1) = a_(p-1) I + a_p X``, then ``H_j = a_j I + X H_(j+1)`` as one ``baddbmm`` each, ``P = H_0``.
    ``horner``, when given, receives ``H_(p-1), ..., H_1`` (for :func:`_gram_space_backward`)."""
    poly = torch.add(scaled_eye, x, alpha=coeffs[-1])
    for a in reversed(coeffs[:-2]):
        if horner is not None:
            horner.append(poly)
        poly = torch.baddbmm(eye, x, poly, beta=a)
    return poly


def _converged(x: Tensor, eye: Tensor, tol: float | None) -> bool:
    """Whether ``||I - X||_F <= tol`` for every matrix of the batch (never without ``tol``)."""
    return tol is not None and bool(_frobenius(eye - x).max() <= tol)


@dataclass
class _GramTape:
    """The intermediates of :func:`_gram_space` that its reverse pass :func:`_gram_space_backward` reads:
    for each step ``j``, ``X_j``, the Horner values ``H_(p-1), ..., H_1`` of ``P_j = P(X_j)``, ``P_j``, the
    product ``T_j = P_j ... P_0`` and, but for the last step, ``R_j = P_j X_j``."""

    xs: list[Tensor] = field(default_factory=list)
    horner: list[list[Tensor]] = field(default_factory=list)
    polys: list[Tensor] = field(default_factory=list)
    transforms: list[Tensor] = field(default_factory=list)
    partial: list[Tensor] = field(default_factory=list)


def _gram_space(
    x: Tensor,
    coeffs: list[float],
    iterations: int,
    identities: tuple[Tensor, Tensor] | None = None,
    tape: _GramTape | None = None,
) -> Tensor:
    """``Q = P(X_k) ... P(X_0)`` for the pre-scaled Gram matrices ``X_0`` ``(E, m, m)``, with
    ``X_(j+1) = P(X_j)^2 X_j``: ``Bjorck^k(W) = Q W`` when ``X_0 = W W^T`` (module docstring). A fixed
    number of steps only: over many steps the recursion is unstable for a rank-deficient ``W``
    (:func:`bjorck_orthonormalize`). ``identities``: :func:`_identities`' constants (made when omitted);
    ``tape`` records the intermediates for :func:`_gram_space_backward`."""
    eye, scaled_eye = _identities(x.shape[-1], coeffs, x) if identities is None else identities
    transform: Tensor | None = None
    for step in range(iterations):
        horner: list[Tensor] | None = None if tape is None else []
        poly = _polynomial(x, eye, scaled_eye, coeffs, horner)
        transform = poly if transform is None else torch.bmm(poly, transform)
        if tape is not None:
            assert horner is not None
            tape.xs.append(x)
            tape.horner.append(horner)
            tape.polys.append(poly)
            tape.transforms.append(transform)
        if step == iterations - 1:
            break
        partial = torch.bmm(poly, x)
        if tape is not None:
            tape.partial.append(partial)
        x = torch.bmm(poly, partial)
    assert transform is not None  # iterations >= 1
    return transform


def _gram_space_backward(tape: _GramTape, coeffs: list[float], grad: Tensor) -> Tensor:
    """The cotangent of ``X_0`` in :func:`_gram_space` (run with ``tape``) for the cotangent ``grad`` of its
    result ``T_(k-1)``: the reverse pass of its products, by hand, each accumulation fused into the
    ``baddbmm`` that makes its term. For ``V = A B`` the cotangents are ``g_A += g_V B^T`` and
    ``g_B += A^T g_V``; for ``H_(p-1) = a_(p-1) I + a_p X``: ``g_X += a_p g_H``. The same cotangent as
    autograd through :func:`_gram_space`, in another summation order (equal in exact arithmetic)."""
    order = len(coeffs) - 1
    grad_x: Tensor | None = None  # cotangent of X_(j+1), the x of the step after the current one
    grad_t = grad  # cotangent of T_j
    for j in reversed(range(len(tape.polys))):
        x, poly = tape.xs[j], tape.polys[j]
        # T_j = P_j T_(j-1) (T_0 = P_0)
        if j:
            grad_p = torch.bmm(grad_t, tape.transforms[j - 1].mT)
            grad_t = torch.bmm(poly.mT, grad_t)
        else:
            grad_p = grad_t
        # X_(j+1) = P_j R_j, R_j = P_j X_j
        grad_xj: Tensor | None = None
        if grad_x is not None:
            grad_p = torch.baddbmm(grad_p, grad_x, tape.partial[j].mT)
            grad_r = torch.bmm(poly.mT, grad_x)
            grad_p = torch.baddbmm(grad_p, grad_r, x.mT)
            grad_xj = torch.bmm(poly.mT, grad_r)
        # Horner: H_i = a_i I + X H_(i+1) (i < p-1), H_(p-1) = a_(p-1) I + a_p X, P_j = H_0
        grad_h = grad_p  # cotangent of H_i, from i = 0
        horner = tape.horner[j][::-1]  # H_1, ..., H_(p-1)
        for i, h_next in enumerate(horner):
            # H_i = a_i I + X H_(i+1): g_X += g_(H_i) H_(i+1)^T, g_(H_(i+1)) = X^T g_(H_i)
            term = grad_h, h_next.mT
            grad_xj = torch.bmm(*term) if grad_xj is None else torch.baddbmm(grad_xj, *term)
            if i < len(horner) - 1:
                grad_h = torch.bmm(x.mT, grad_h)
        # H_(p-1) = a_(p-1) I + a_p X (order 1: P_j itself); its cotangent X^T g_(H_(p-2)) is made in the
        # same kernel
        if order == 1:
            grad_x = grad_h * coeffs[-1] if grad_xj is None else torch.add(grad_xj, grad_h, alpha=coeffs[-1])
        else:
            assert grad_xj is not None
            grad_x = torch.baddbmm(grad_xj, x.mT, grad_h, alpha=coeffs[-1])
    assert grad_x is not None
    return grad_x


def _gram_prescale_backward(
    x: Tensor, bound: Tensor, grad_x: Tensor, coef: Tensor, grad_coef: Tensor, steps: int
) -> Tensor:
    """``S + S^T`` for the cotangent ``S`` of the Gram matrices ``G`` ``(E, m, m)`` (symmetric PSD) through
    ``X = G / b`` and ``coef = c b^(-1/2)`` (any constants ``c`` ``(E,)``), ``b = max(gram_norm_bound(G,
    steps), tiny)`` (``bound``), for the cotangents ``grad_x`` of ``X`` and ``grad_coef`` ``(E,)`` of
    ``coef``: ``S = (grad_x - (<grad_x, X> + grad_coef coef / 2) X^(2q - 1)) / b``, ``q = 2^steps``.

    Why: ``b = ||G^q||_F^(1/q)`` and, for symmetric ``G``, ``d ||G^q||_F^2 = 2q <G^(2q-1), dG>``, so
    ``db/dG = b^(1-2q) G^(2q-1) = X^(2q-1)`` (its spectral norm is at most 1: no overflow), a symmetric
    matrix: ``S + S^T = (grad_x + grad_x^T - 2 (...) X^(2q-1)) / b``. Where the clamp at ``tiny`` is active
    (a zero matrix) ``b`` is constant: its term is zero there. Equal in exact arithmetic to autograd through
    :func:`gram_norm_bound` and the division (which differentiates the products of the Gram iteration one
    by one), but for the ``tiny`` that :func:`gram_norm_bound` adds to a norm (a relative ``tiny m^2`` at
    most, far below rounding).
    """
    # -b dL/db, zero where the clamp holds b constant
    minus_db = torch.addcmul(_inner(grad_x, x), grad_coef, coef, value=0.5)
    minus_db.masked_fill_(bound <= torch.finfo(bound.dtype).tiny, 0.0)
    power, odd = x, x  # X^(2^i), X^(2^(i+1) - 1)
    for _ in range(steps):
        power = torch.bmm(power, power)
        odd = torch.bmm(odd, power)
    both = torch.addcmul(grad_x + grad_x.mT, odd, minus_db[:, None, None], value=-2.0)
    return both / bound[:, None, None]


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """``<A, B>`` for each pair of matrices of two batches ``(E, m, n)`` (one ``bmm``)."""
    return torch.bmm(a.reshape(a.shape[0], 1, -1), b.reshape(b.shape[0], -1, 1)).reshape(-1)


def bjorck_gram_transform(
    gram: Tensor, iterations: int, order: int = 1, bound_steps: int = 2, scale: Tensor | None = None
) -> Tensor:
    """``T`` with ``scale * Bjorck(W) = T W`` (``m <= n``) or ``W T`` (``m > n``), from the smaller Gram
    matrix ``G`` ``(E, m, m)`` of each ``W`` of a batch; differentiable.

    ``T = scale * P(X_(k-1)) ... P(X_0) / sqrt(b)`` with ``b = gram_norm_bound(G, bound_steps)``,
    ``X_0 = G / b`` and ``X_(j+1) = P(X_j)^2 X_j`` (``iterations = k`` steps of order ``order``, as
    :func:`bjorck_orthonormalize` without a tolerance; ``scale`` ``(E,)`` multiplies each matrix, 1 when
    omitted). Zero padding is exact: for ``G`` in the top-left ``m x m`` block of a larger zero matrix,
    ``T``'s top-left block is the ``T`` of ``G`` (every quantity is block diagonal and the bound sees
    the same Frobenius norms; ``docs/proofs/convolutions.md#lemma-batched-bjorck``), which is how
    :mod:`lipnet.layers.batching` orthonormalises matrices of several sizes in one call.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    # a zero matrix gets a positive bound (and T W = 0); the clamp's zero gradient there also stops the
    # 0 * inf of d(b^-1/2)/db at b = tiny, so a zero weight gets finite gradients
    bound = gram_norm_bound(gram, bound_steps).clamp_min(torch.finfo(gram.dtype).tiny)
    transform = _gram_space(gram / bound[:, None, None], _monomial_coefficients(order), iterations)
    coef = bound.rsqrt() if scale is None else bound.rsqrt() * scale
    return transform * coef[:, None, None]


def _bjorck_direct(
    w: Tensor, x: Tensor, coeffs: list[float], iterations: int, tol: float | None, wide: bool
) -> Tensor:
    """The Björck iteration on the pre-scaled batch ``w`` ``(E, m, n)`` itself (``x``: its smaller Gram
    matrix)."""
    eye, scaled_eye = _identities(x.shape[-1], coeffs, x)
    for step in range(iterations):
        if step:
            x = torch.bmm(w, w.mT) if wide else torch.bmm(w.mT, w)
        converged = _converged(x, eye, tol)
        poly = _polynomial(x, eye, scaled_eye, coeffs)
        w = torch.bmm(poly, w) if wide else torch.bmm(w, poly)
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
    ``G`` and to apply ``Q`` (:func:`bjorck_gram_transform`). This is the Björck iteration exactly, in
    exact arithmetic. ``P(X) = sum_i c_i (I - X)^i`` is evaluated in the monomial form
    ``sum_j a_j X^j`` (exact coefficients), one kernel per degree.

    Runs ``iterations`` steps; with ``tol``, stops once ``||I - G_k||_F <= tol`` (after one more
    step, which takes the error to about ``tol^(order + 1)``).

    Near-square matrices (larger side below 1.5 times the smaller), and every matrix when ``tol`` is
    given, run the same iteration on the ``m x n`` iterate itself, ``W_{k+1} = P(I - W_k W_k^T) W_k``:
    a step then costs ``2 m^2 n + m^3`` multiply-adds instead of ``4 m^3`` (for a square matrix 11
    products in 3 steps instead of 13), and the tolerance is checked on the actual iterate. The
    converging mode (``tol``) never uses the Gram-space recursion because it is unstable for a
    rank-deficient matrix: on the Gram matrix's null space ``P`` multiplies ``Q_k`` by ``sum_i c_i > 1``
    at every step (1.875 for order 2), so over tens of steps the rounding of ``Q_k W`` grows without
    bound (NaN after 100 steps for a matrix with equal rows), while the direct iterate never leaves
    the row space of ``W``. Same iterates, pre-scaling and stopping rule in exact arithmetic.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    shape = matrix.shape
    w = matrix.reshape(-1, *shape[-2:])
    wide = shape[-2] <= shape[-1]
    coeffs = _monomial_coefficients(order)
    gram = torch.bmm(w, w.mT) if wide else torch.bmm(w.mT, w)
    bound = gram_norm_bound(gram, bound_steps).clamp_min(torch.finfo(w.dtype).tiny)[:, None, None]
    small, large = sorted(shape[-2:])
    if tol is not None or 2 * large < 3 * small:
        w = _bjorck_direct(w / bound.sqrt(), gram / bound, coeffs, iterations, tol, wide)
        return w.reshape(shape)
    transform = _gram_space(gram / bound, coeffs, iterations) * bound.rsqrt()
    w = torch.bmm(transform, w) if wide else torch.bmm(w, transform)
    return w.reshape(shape)


def _settle(
    tape: _GramTape, identities: tuple[Tensor, Tensor], coeffs: list[float], settle: int, tol: float
) -> tuple[Tensor, Tensor]:
    """:func:`bjorck_settled`'s settling steps after the ``k`` steps recorded in ``tape`` (:func:`_gram_space`
    run on the pre-scaled Gram matrices ``(E, m, m)``, no gradient): ``(P(X_(k+s-1)) ... P(X_0), gain)``,
    ``s = settle``, ``gain`` ``(E,)`` = ``a_0^max(n - k, 0)`` with ``n`` the steps up to and including the
    first that moves its matrix by less than ``tol`` (``k + s`` when none does). The settling steps are
    :func:`_gram_space` again, from ``X_k``, recorded for their changes.

    ``||W_(j+1) - W_j||_F^2 = tr((P_j - I) X_j (P_j - I)) = <(P_j - I) X_j, P_j - I>`` (all of them
    commute), taken for every step but the last (whose change cannot stop the count) and compared with
    ``tol`` after the loop: no host synchronisation. Zero padding (:mod:`lipnet.layers.batching`) adds
    nothing to it (``(P - I) X`` is zero on the padded block)."""
    eye = identities[0]
    last = tape.polys[-1]
    rest = _GramTape()
    tail = _gram_space(torch.bmm(last, torch.bmm(last, tape.xs[-1])), coeffs, settle, identities, rest)
    transform = torch.bmm(tail, tape.transforms[-1])
    polys, xs = tape.polys + rest.polys[:-1], tape.xs + rest.xs[:-1]
    changes = [poly - eye for poly in polys]
    moved = [_inner(torch.bmm(change, x), change) for change, x in zip(changes, xs, strict=True)]
    # n = 1 + the number of steps before the first that moved less than tol (all of them if none did)
    still = torch.stack(moved, dim=-1) >= tol * tol
    steps = 1 + still.cumprod(dim=-1).sum(dim=-1)
    gain = (coeffs[0] ** (steps - len(tape.polys)).clamp_min(0)).to(transform.dtype)
    return transform, gain


def bjorck_settled(
    matrix: Tensor,
    iterations: int,
    settle: int,
    order: int = 1,
    tol: float = 1e-3,
    bound_steps: int = 2,
) -> Tensor:
    """Björck orthonormalisation of each matrix of a batch ``(..., m, n)`` whose value is settled and whose
    gradient is that of the first ``iterations`` steps, amplified by how far the rest had to go.

    Value: the iterate after ``iterations + settle`` steps of order ``order`` from the sound pre-scaling of
    :func:`bjorck_orthonormalize` (singular values in ``[0, 1]`` in exact arithmetic, as every iterate).
    Gradient: that of the ``iterations``-step map (:func:`bjorck_orthonormalize`) times
    ``a_0^max(n - iterations, 0)``, with ``a_0 = P(0)`` the constant of the step polynomial (3/2 for order
    1) and ``n`` the number of steps up to and including the first that moves the matrix by less than
    ``tol`` in Frobenius norm (``iterations + settle`` when none does). This is the gradient of
    deel-torchlip's ``SpectralLinear`` (its Björck loop detaches the cubic term of every step after the
    fourth, so each later step passes the gradient on times 3/2, and stops at that tolerance), taken on
    the device without a host synchronisation: the steps after the ``n``-th change the value by less
    than ``tol`` and not the gradient. Measured (docs/benchmarks.md, "The accurate end"): the gain, which
    grows as the raw weight drifts from orthonormal, is what raises the large-τ accuracy; the settled
    value alone, or the steps without the gain, does not.

    The settling steps run on the smaller Gram matrix (``X_(j+1) = P(X_j)^2 X_j``, no gradient;
    :func:`_settle`): a fixed number of steps, so the recursion's drift on a rank-deficient matrix
    (:func:`bjorck_orthonormalize`) stays at rounding level times ``a_0^(iterations + settle)``.
    """
    if settle < 1:
        raise ValueError(f"settle must be >= 1, got {settle}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    head = bjorck_orthonormalize(matrix, iterations, order, None, bound_steps)
    shape = matrix.shape
    wide = shape[-2] <= shape[-1]
    coeffs = _monomial_coefficients(order)
    with torch.no_grad():
        w = matrix.detach().reshape(-1, *shape[-2:])
        gram = torch.bmm(w, w.mT) if wide else torch.bmm(w.mT, w)
        bound = gram_norm_bound(gram, bound_steps).clamp_min(torch.finfo(w.dtype).tiny)
        x = gram / bound[:, None, None]
        identities = _identities(x.shape[-1], coeffs, x)
        tape = _GramTape()
        _gram_space(x, coeffs, iterations, identities, tape)
        transform, gain = _settle(tape, identities, coeffs, settle, tol)
        transform = transform * bound.rsqrt()[:, None, None]
        value = torch.bmm(transform, w) if wide else torch.bmm(w, transform)
        gain = gain.reshape(*shape[:-2], 1, 1)
    return value.reshape(shape) + gain * (head - head.detach())


class BjorckOrthonormal(CachedParametrization):
    """Parametrization ``weight = scale * Bjorck(W)`` per group (:func:`bjorck_orthonormalize`).

    The raw weight of shape ``(rows, ...)`` is viewed as ``groups`` matrices of shape
    ``(rows / groups, numel / rows)`` (the reshaped kernel of a grouped convolution). In training
    mode ``train_iterations`` steps of order ``order`` run in the weight's dtype, differentiated
    through. In eval mode the iteration runs in float64 until ``||I - Gram||_F <= eval_tol``
    (at most ``eval_max_iterations`` steps) and the result is cast back and cached. With
    ``settle_iterations > 0`` the training weight is :func:`bjorck_settled`'s instead: the iterate after
    ``train_iterations + settle_iterations`` steps, with the gradient of the first ``train_iterations``
    times ``P(0)^m`` (``m`` the steps after those until one moves the weight by less than ``settle_tol``).
    Such a weight is computed on its own, not in a model's batched call (:mod:`lipnet.layers.batching`).

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
        settle_iterations: int = 0,
        settle_tol: float = 1e-3,
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
        if settle_iterations < 0 or not settle_tol > 0:
            raise ValueError(
                f"settle_iterations must be >= 0 and settle_tol > 0, got {settle_iterations} and {settle_tol}"
            )
        self.groups = groups
        self.scale = scale
        self.train_iterations = train_iterations
        self.order = order
        self.eval_max_iterations = eval_max_iterations
        self.eval_tol = eval_tol
        self.bound_steps = bound_steps
        self.settle_iterations = settle_iterations
        self.settle_tol = settle_tol
        #: The :class:`~lipnet.layers.batching.WeightBatcher` that computes this weight in training, if any
        #: (set by :func:`~lipnet.layers.batching.batch_weights`).
        self.batcher: WeightBatcher | None = None

    def forward(self, original: Tensor) -> Tensor:
        # In training, a model-wide WeightBatcher (lipnet.layers.batching) computes this weight together
        # with the model's other Björck weights, once per forward pass; None means: compute it here.
        if self.training and self.batcher is not None:
            with full_precision(original.device.type):
                weight = self.batcher.weight(self, original)
            if weight is not None:
                return weight
        return super().forward(original)

    def compute(self, original: Tensor) -> Tensor:
        rows = original.shape[0]
        if rows % self.groups:
            raise ValueError(f"weight has {rows} rows, not divisible by groups={self.groups}")
        w = original.reshape(self.groups, rows // self.groups, -1)
        if self.training and self.settle_iterations:
            w = bjorck_settled(
                w,
                self.train_iterations,
                self.settle_iterations,
                self.order,
                self.settle_tol,
                self.bound_steps,
            )
        elif self.training:
            w = bjorck_orthonormalize(w, self.train_iterations, self.order, None, self.bound_steps)
        else:
            w = bjorck_orthonormalize(
                w.to(torch.float64), self.eval_max_iterations, self.order, self.eval_tol, self.bound_steps
            )
        if self.scale != 1.0:
            w = self.scale * w
        return w.to(original.dtype).reshape(original.shape)

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, scale={self.scale:.6g}, train_iterations={self.train_iterations}, "
            f"order={self.order}, eval_max_iterations={self.eval_max_iterations}, eval_tol={self.eval_tol:g}"
            + (
                f", settle_iterations={self.settle_iterations}, settle_tol={self.settle_tol:g}"
                if self.settle_iterations
                else ""
            )
        )


def bjorck(
    module: PlainLayer,
    *,
    train_iterations: int = 3,
    order: int = 2,
    eval_max_iterations: int = 100,
    eval_tol: float = 1e-12,
    settle_iterations: int = 0,
    settle_tol: float = 1e-3,
) -> PlainLayer:
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
    ``||I - Gram||_F <= eval_tol`` (at most ``eval_max_iterations`` steps) and is cached;
    ``settle_iterations`` / ``settle_tol``: :class:`BjorckOrthonormal`'s settled training weight. ``certify``
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
        settle_iterations=settle_iterations,
        settle_tol=settle_tol,
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
    orthogonal. ``settle_iterations`` / ``settle_tol``: the settled training weight of
    :class:`BjorckOrthonormal` (:func:`bjorck_settled`).
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
        settle_iterations: int = 0,
        settle_tol: float = 1e-3,
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
            settle_iterations=settle_iterations,
            settle_tol=settle_tol,
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
        padding_mode: PaddingMode = "zeros",
        *,
        train_iterations: int = 3,
        order: int = 2,
        eval_max_iterations: int = 100,
        eval_tol: float = 1e-12,
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
