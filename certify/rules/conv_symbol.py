"""Certified maxima of a convolution's symbol ``sigma_max(K(w))``, over a DFT grid or the whole torus.

A convolution's norm on the infinite grid Z^nd, or on a circle, is the largest singular value of its
symbol ``K(w) = sum_q W_q exp(-i <q, w>)`` (``c_out x c_in`` per group) over the continuous torus,
or over a DFT grid (items 2 to 4 of :mod:`certify.rules.conv`). :func:`infinite_grid_kernel` turns
a strided, dilated kernel into the stride-1 kernel with that symbol (:func:`dilate`,
:func:`polyphase`: item 1 of :mod:`certify.rules.conv`); :func:`symbol_bound` certifies the maximum,
on a grid (exact to 1e-6 where affordable: Cholesky factorisations certify every grid point below
the largest eigenvalue found, Higham, *Accuracy and Stability of Numerical Algorithms*, Thm. 10.3)
or over the torus (:func:`continuum_sup`, a bound of every grid's maximum).

The torus, by branch and bound. Let ``H(w) = sum_e A_e exp(-i <e, w>)`` be the Gram symbol on the
smaller side (``K^H K`` or ``K K^H``; offsets ``|e_i| <= D_i = taps_i - 1``),
``lambda* = max_w lambda_max(H(w))`` attained at w* with unit eigenvector v, and
``m = max(0, lambda_min(A_0) - sum_{e != 0} ||A_e||_F) <= lambda_min(H(w))``. Then
``phi(w) = v^H H(w) v`` is a real trigonometric polynomial with ``m <= phi <= lambda*``,
``phi(w*) = lambda*`` and ``grad phi(w*) = 0``. If a cell of centre c and half-widths h contains w*,
the second derivative of ``t -> phi(w* + t (c - w*))`` is bounded (a) by Bernstein's inequality
applied to ``phi - (lambda* + m) / 2``, a function of exponential type ``sigma = sum_i D_i h_i`` and
modulus at most ``(lambda* - m) / 2``: by ``sigma^2 (lambda* - m) / 2``; (b) term by term: by
``sum_e (sum_i |e_i| h_i)^2 ||A_e||_F =: 2 kappa``. Taylor's formula then gives::

    lambda* <= min((lambda_max(H(c)) - sigma^2 m / 4) / (1 - sigma^2 / 4),
                   lambda_max(H(c)) + kappa)                                    (sigma < 2)

(a) is the sharper one for generic kernels, (b) for nearly orthogonal ones. The cells tile
half the torus (``H(-w)`` is the conjugate of ``H(w)`` for a real kernel), so the max of the
right-hand side over the cells bounds lambda*. A cell is retired once a Cholesky factorisation
certifies that its right-hand side is at most ``(1 + _RTOL)^2`` times the reference, the
largest eigenvalue computed so far; at the others ``lambda_max(H(c))`` is computed, which
raises the reference and retires the cells whose right-hand side is below it, and the rest are
split in three per axis. (A reference left more than ``_RTOL`` below the max would keep every
cell above it open at every level: a ninefold growth per level, a minute for a trained
16-channel kernel whose top eigenvalues are nearly equal.) A flat symbol needs
``sigma^2 / 4 <= 2 _RTOL``: about three levels for a 3x3 kernel, 7 700 cells at most. The
global bound ``lambda_max(A_0) + sum_{e != 0} ||A_e||_F`` (exact for an orthogonal
convolution) also holds and the min is returned. The refinement has a budget counted in cells
(:func:`_refinement_budget`, about a second of one core); past it the open cells keep their
own right-hand side, at most ``1 / (1 - sigma^2 / 4)`` times the reference. Float64 rounding
of H and of its eigenvalues is added explicitly (``_GramSymbol.error``).

Every value returned is an upper bound, in float64, times ``1 + FLOAT64_SLACK``.

Proofs: ``docs/proofs/frequency-bounds.md#lemma-cell-bound`` (and ``#lemma-global-symbol``,
``#lemma-symbol-norm``); the Cholesky certificate: ``docs/proofs/numerics.md#lemma-cholesky``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from certify.contract import FLOAT64_SLACK, Shape

__all__ = ["continuum_sup", "dilate", "infinite_grid_kernel", "polyphase", "symbol_bound"]

#: Relative gap (on sigma_max) at which the branch and bound stops refining a cell.
_RTOL = 2e-3
#: Target of the certified max over a DFT grid (no correction is needed there): the bound is within
#: 1e-6 of the grid max; rounds of "certify below the target, else find a better maximum".
_GRID_TARGET = (1.0 + 1e-6) ** 2
_GRID_ROUNDS = 3
#: Exponential type of the initial cells of the branch and bound (correction factor 1/(1 - 1/4)).
_SIGMA0 = 1.0
#: Refinement budget of the branch and bound, counted in cells (never in seconds, so that the bound
#: does not depend on the machine): at most _CONTINUUM_WORK / _cell_work(symbol) refined cells (about
#: a second of one core: 80 000 cells for 16 channels), and never fewer than _MIN_REFINED. Past it
#: the open cells keep their own bound from exact eigenvalues (still sound, looser).
_CONTINUUM_WORK = 1 << 30
_MIN_REFINED = 2_000
#: Power iterations behind the guesses that choose where to compute exact eigenvalues, and how
#: many of them.
_POWER_STEPS = 8
_PROBES = 2
_GUESSES = 128
#: A DFT grid is used instead of the branch and bound when (points * groups * side^3) is below
#: this (about a second of LAPACK on one core) or when it has fewer points than the branch and
#: bound would start with.
_GRID_WORK = 1 << 28
#: Complex entries of Gram matrices built at once, and kept for reuse when a frequency set fits.
_CHUNK_ELEMENTS = 1 << 22
_HOLD_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------
# Kernels: dilation, polyphase


def dilate(kernel: Tensor, dilation: Shape) -> Tensor:
    """The kernel ``(g, o, c, *taps)`` with ``d - 1`` zero taps between its taps, per axis."""
    if all(d == 1 for d in dilation):
        return kernel
    taps = kernel.shape[3:]
    out = kernel.new_zeros(*kernel.shape[:3], *((t - 1) * d + 1 for t, d in zip(taps, dilation, strict=True)))
    index: tuple[Any, ...] = (..., *(slice(None, None, d) for d in dilation))
    out[index] = kernel
    return out


def polyphase(kernel: Tensor, stride: Shape) -> Tensor:
    """Stride-s kernel ``(g, o, c, *K)`` -> stride-1 kernel ``(g, o, c * prod(s), *ceil(K / s))``.

    Tap ``q s + r`` of the input becomes tap q of phase channel ``(c, r)``.
    """
    if all(s == 1 for s in stride):
        return kernel
    nd = len(stride)
    taps = [-(-t // s) for t, s in zip(kernel.shape[3:], stride, strict=True)]
    grow = [t * s - size for t, s, size in zip(taps, stride, kernel.shape[3:], strict=True)]
    padded = F.pad(kernel, [p for extra in reversed(grow) for p in (0, extra)])
    g, o, c = kernel.shape[:3]
    split = padded.reshape(g, o, c, *itertools.chain.from_iterable(zip(taps, stride, strict=True)))
    order = [0, 1, 2, *(4 + 2 * i for i in range(nd)), *(3 + 2 * i for i in range(nd))]
    return split.permute(order).reshape(g, o, c * math.prod(stride), *taps)


def infinite_grid_kernel(kernel: Tensor, stride: Shape, dilation: Shape) -> Tensor:
    """The stride-1 kernel whose symbol sup is the norm of the convolution on Z^nd (item 1)."""
    reduced_s, reduced_d = [], []
    for s, d in zip(stride, dilation, strict=True):
        g = math.gcd(s, d)
        reduced_s.append(s // g)
        reduced_d.append(d // g if s // g > 1 else 1)
    return polyphase(dilate(kernel, tuple(reduced_d)), tuple(reduced_s))


def _trim(kernel: Tensor) -> Tensor:
    """Drop all-zero leading and trailing taps: a shift multiplies the symbol by a unit scalar."""
    nd = kernel.ndim - 3
    for axis in range(3, 3 + nd):
        other = [a for a in range(kernel.ndim) if a != axis]
        used = torch.nonzero(kernel.abs().amax(dim=other) > 0).flatten()
        if used.numel() == 0:
            return kernel.new_zeros(*kernel.shape[:3], *([1] * nd))
        kernel = kernel.narrow(axis, int(used[0]), int(used[-1] - used[0]) + 1)
    return kernel


# ---------------------------------------------------------------------------------------------
# Symbols: certified maxima of sigma_max(K(w))^2 over frequencies

#: Unit roundoff of float64.
_U = 2.0**-53


def _index_grid(sizes: Shape) -> Tensor:
    return torch.cartesian_prod(*(torch.arange(n) for n in sizes)).reshape(-1, len(sizes))


class _GramSymbol:
    """``H(w)``, per group, the Gram matrix of the symbol of a stride-1 kernel, at any frequencies.

    ``K(w) = sum_q W_q exp(-i <q, w>)`` (``c_out x c_in``) and ``H(w)`` is ``K^H K`` or ``K K^H``,
    whichever is smaller: ``lambda_max(H(w)) = sigma_max(K(w))^2``. With ``coefficients`` the
    Fourier coefficients ``A_e`` of ``H`` are computed exactly from ``2 t - 1`` samples per axis;
    they give the floor ``m_g``, the global bound of item 2 of the module docstring, and a cheaper
    evaluation when there are fewer of them than output channels.

    ``error`` bounds, in absolute terms, the float64 rounding of every computed ``H(w)`` and of its
    eigenvalues: each entry sums at most ``n_ops`` products bounded by ``scale``, with
    ``scale = (sum_q ||W_q||_F)^2 >= ||K(w)||_F^2`` and ``||E||_2 <= side * max |E_ij|``.
    """

    def __init__(self, kernel: Tensor, *, coefficients: bool) -> None:
        g, o, c = kernel.shape[:3]
        nd = kernel.ndim - 3
        taps = tuple(kernel.shape[3:])
        self.groups, self.rows, self.cols, self.side = g, o, c, min(o, c)
        self.taps = _index_grid(taps).to(torch.float64)
        self.flat_kernel = (
            kernel.permute(*range(3, 3 + nd), 0, 1, 2).reshape(-1, g * o * c).to(torch.complex128)
        )
        tap_norms = kernel.flatten(3).norm(dim=(1, 2))  # (g, taps)
        self.scale = float(tap_norms.sum(dim=1).max()) ** 2
        self.coeffs: Tensor | None = None
        self.coeff_norms: Tensor | None = None
        self.deltas: Tensor | None = None
        self.floor = torch.zeros(g, dtype=torch.float64)
        self.global_top = math.inf
        n_ops = o + c + 2 * self.taps.shape[0] + 16 * sum(taps) + 64
        if coefficients:
            big = tuple(2 * t - 1 for t in taps)
            symbol = torch.fft.fftn(kernel, s=big, dim=tuple(range(3, 3 + nd)))
            grams = self._gram(symbol.flatten(3).permute(3, 0, 1, 2))
            coeffs = torch.fft.ifftn(grams.reshape(*big, g, self.side, self.side), dim=tuple(range(nd)))
            self.coeffs = coeffs.reshape(-1, g * self.side * self.side)
            index = _index_grid(big)
            self.deltas = torch.where(index < torch.tensor(taps), index, index - torch.tensor(big)).to(
                torch.float64
            )
            per_delta = coeffs.reshape(-1, g, self.side, self.side)
            a0 = (per_delta[0] + per_delta[0].mH) / 2
            self.coeff_norms = torch.linalg.matrix_norm(per_delta[1:], ord="fro")  # (deltas - 1, g)
            rest = self.coeff_norms.sum(dim=0)
            extremes = torch.linalg.eigvalsh(a0)
            self.floor = (extremes[:, 0] - rest).clamp_min(0.0)
            self.global_top = float((extremes[:, -1] + rest).max())
            n_ops += 2 * per_delta.shape[0] + 8 * int(math.log2(per_delta.shape[0]) + 1)
        self.error = 16 * _U * n_ops * self.side * self.scale

    def _gram(self, symbol: Tensor) -> Tensor:
        return symbol.mH @ symbol if self.cols <= self.rows else symbol @ symbol.mH

    def _coefficients(self) -> tuple[Tensor, Tensor] | None:
        """``(A_e, e)`` when building ``H`` from its Fourier coefficients is the cheaper way, else None."""
        if self.coeffs is None or self.deltas is None:
            return None
        direct = self.taps.shape[0] * self.rows * self.cols + self.rows * self.cols * self.side
        return (self.coeffs, self.deltas) if self.deltas.shape[0] * self.side * self.side <= direct else None

    def matrices(self, points: Tensor) -> Tensor:
        """``H`` at ``points`` (``(P, nd)`` radians): ``(P, groups, side, side)`` complex."""
        g, s = self.groups, self.side
        coefficients = self._coefficients()
        if coefficients is not None:
            coeffs, deltas = coefficients
            phases = torch.exp(-1j * (points @ deltas.T))
            return (phases @ coeffs).reshape(-1, g, s, s)
        phases = torch.exp(-1j * (points @ self.taps.T))
        return self._gram((phases @ self.flat_kernel).reshape(-1, g, self.rows, self.cols))

    def curvature(self, half: Tensor) -> Tensor:
        """Per group, half the largest ``|d^2/dt^2 v^H H(w + t delta) v|`` over ``|delta_i| <= half_i``.

        ``sum_e <e, delta>^2 ||A_e||`` bounds that second derivative for every unit v; small when
        the symbol is nearly flat (a nearly orthogonal convolution), where Bernstein's is not.
        """
        if self.coeff_norms is None or self.deltas is None:
            return torch.full((self.groups,), math.inf, dtype=torch.float64)
        weights = (self.deltas[1:].abs() @ half) ** 2
        return 0.5 * (weights @ (self.coeff_norms + 2 * self.error))


class _Frequencies:
    """Frequencies of one symbol with ``H`` there: held in memory when small, else built in chunks."""

    def __init__(self, symbol: _GramSymbol, points: Tensor, held: Tensor | None = None) -> None:
        self.symbol, self.points = symbol, points
        per_point = symbol.groups * max(symbol.side * symbol.side, symbol.rows * symbol.cols)
        self.step = max(1, _CHUNK_ELEMENTS // per_point)
        if held is None and points.shape[0] * per_point <= _HOLD_ELEMENTS:
            held = symbol.matrices(points)
        self.held = held

    def __len__(self) -> int:
        return self.points.shape[0]

    def take(self, index: Tensor) -> _Frequencies:
        return _Frequencies(self.symbol, self.points[index], None if self.held is None else self.held[index])

    def blocks(self) -> Iterator[Tensor]:
        if self.held is not None:
            yield self.held
            return
        for i in range(0, len(self), self.step):
            yield self.symbol.matrices(self.points[i : i + self.step])

    def exact(self) -> Tensor:
        """Computed ``lambda_max(H_g(w))``, ``(P, groups)``; the true value is within ``symbol.error``."""
        return torch.cat([torch.linalg.eigvalsh(h)[..., -1] for h in self.blocks()])

    def estimate(self) -> Tensor:
        """A cheap guess of ``max_g lambda_max(H_g(w))`` per point (power iteration; no guarantee)."""
        gen = torch.Generator().manual_seed(0)
        start = torch.randn((self.symbol.groups, self.symbol.side, 1), generator=gen, dtype=torch.complex128)
        out = []
        for h in self.blocks():
            v = start.expand(h.shape[0], -1, -1, -1)
            for _ in range(_POWER_STEPS):
                v = h @ v
                v = v / torch.linalg.vector_norm(v, dim=(-2, -1), keepdim=True).clamp_min(1e-300)
            out.append((v.mH @ h @ v).real.reshape(h.shape[0], -1).amax(dim=1))
        return torch.cat(out)

    def below(self, mu: Tensor) -> Tensor:
        """Per point: whether ``lambda_max(H_g(w)) <= mu_g`` is certified for every group g.

        A Cholesky factorisation of ``nu I - H`` that completes in floating point proves
        ``lambda_min(nu I - H) >= -gamma_(s+1) tr(nu I - H)`` (Higham, Accuracy and Stability of
        Numerical Algorithms, Thm. 10.3, and its complex analogue); ``nu`` is ``mu`` less a
        multiple of that and the rounding ``error`` of ``H``.
        """
        symbol = self.symbol
        nu = mu - 8 * _U * (symbol.side + 1) ** 2 * (mu.abs() + symbol.error) - symbol.error
        if not bool((nu > 0).all()):
            return torch.zeros(len(self), dtype=torch.bool)
        eye = torch.eye(symbol.side, dtype=torch.complex128)
        out = [
            (torch.linalg.cholesky_ex(nu[:, None, None] * eye - h).info == 0).all(dim=1)
            for h in self.blocks()
        ]
        return torch.cat(out)

    def best(self) -> float:
        """A computed ``lambda_max`` at the most promising few of (an even subsample of) the points."""
        sample = self
        if len(self) > _GUESSES:
            sample = self.take(torch.linspace(0, len(self) - 1, _GUESSES).round().long())
        top = sample.estimate().topk(min(_PROBES, len(sample))).indices
        return float(sample.take(top).exact().max())


def _half_torus(counts: Shape) -> Tensor:
    """Grid indices m with m <= -m (mod counts) lexicographically: one of each +-pair."""
    grid = _index_grid(counts)
    neg = (-grid) % torch.tensor(counts)
    weights = torch.tensor([math.prod(counts[i + 1 :]) for i in range(len(counts))])
    return grid[(grid * weights).sum(1) <= (neg * weights).sum(1)]


def _frequencies(counts: Shape) -> Tensor:
    """Half of the ``counts`` DFT grid (``H(-w)`` is the conjugate of ``H(w)``), in radians."""
    return _half_torus(counts).to(torch.float64) * (2 * math.pi / torch.tensor(counts, dtype=torch.float64))


def _grid_sup(kernel: Tensor, grid: Shape) -> float:
    """Max over the DFT grid of ``sigma_max(K(w))`` (the circular convolution's norm), to 1e-6."""
    points = _frequencies(grid)
    coefficients = math.prod(2 * t - 1 for t in kernel.shape[3:]) * 4 <= points.shape[0]
    symbol = _GramSymbol(kernel, coefficients=coefficients)
    pending = _Frequencies(symbol, points)
    if len(pending) <= _PROBES:
        return math.sqrt(max(float(pending.exact().max()) + 2 * symbol.error, 0.0)) * (1.0 + FLOAT64_SLACK)
    best = pending.best()
    for _ in range(_GRID_ROUNDS):
        passed = pending.below(torch.full((symbol.groups,), _GRID_TARGET * best, dtype=torch.float64))
        pending = pending.take(~passed)
        if len(pending) == 0:
            break
        better = pending.best()
        if better <= best:
            break
        best = better
    top = _GRID_TARGET * best
    if len(pending):
        top = max(top, float(pending.exact().max()))
    return math.sqrt(max(top + 2 * symbol.error, 0.0)) * (1.0 + FLOAT64_SLACK)


def _initial_counts(degrees: Shape) -> Shape:
    active = sum(1 for d in degrees if d > 0)
    return tuple(max(1, math.ceil(math.pi * d * active / _SIGMA0)) if d > 0 else 1 for d in degrees)


def _continuum_points(kernel: Tensor) -> int:
    return _half_torus(_initial_counts(tuple(t - 1 for t in _trim(kernel).shape[3:]))).shape[0]


def _refinement_budget(symbol: _GramSymbol) -> int:
    """Most cells :func:`continuum_sup` may refine for ``symbol``.

    A cell costs a Cholesky factorisation (``side^3 / 3`` complex operations per group), the sum
    that builds ``H`` there (a few dozen ``side^2`` terms) and a fixed overhead; the weights make
    one unit about a nanosecond of one core at every side.
    """
    side = symbol.side
    return max(_MIN_REFINED, _CONTINUUM_WORK // (symbol.groups * (side**3 + 32 * side**2 + 1024)))


def continuum_sup(kernel: Tensor) -> float:
    """Certified ``sup_w sigma_max(K(w))`` over the continuous torus, within about ``_RTOL`` (item 2)."""
    kernel = _trim(kernel)
    nd = kernel.ndim - 3
    degrees = tuple(t - 1 for t in kernel.shape[3:])
    if max(degrees) == 0:
        return _grid_sup(kernel, (1,) * nd)
    symbol = _GramSymbol(kernel, coefficients=True)
    counts = _initial_counts(degrees)
    half = torch.tensor([math.pi / n for n in counts], dtype=torch.float64)
    cells = _Frequencies(symbol, _frequencies(counts))
    best = cells.best()
    target = (1.0 + _RTOL) ** 2
    deg = torch.tensor(degrees, dtype=torch.float64)
    active = [i for i, d in enumerate(degrees) if d > 0]
    offsets = torch.zeros((3 ** len(active), nd), dtype=torch.float64)
    offsets[:, active] = _index_grid((3,) * len(active)).to(torch.float64) - 1
    offsets = offsets[offsets.abs().sum(1) > 0] * (2.0 / 3.0)
    budget = _refinement_budget(symbol)
    refined = 0
    while True:
        if symbol.global_top <= target * best:
            top = symbol.global_top
            break
        sigma2 = float((deg * half).sum()) ** 2
        denom = 1.0 - sigma2 / 4.0
        curvature = symbol.curvature(half)
        mu = torch.maximum(target * best * denom + sigma2 * symbol.floor / 4, target * best - curvature)
        failed = cells.take(~cells.below(mu))
        if len(failed) == 0:
            top = target * best
            break
        # Exact eigenvalues at the failed centres (the true ones are at most symbol.error above):
        # the reference `best` becomes the largest of them, and each cell gets its own bound. With
        # a reference left below the max by more than _RTOL (a guess from a few power iterations
        # on a symbol whose top eigenvalues are nearly equal), every cell above it would fail at
        # every level and the refinement would grow ninefold per level.
        values = failed.exact() + symbol.error
        best = max(best, float(values.max()))
        upper = torch.minimum((values - sigma2 * symbol.floor / 4) / denom, values + curvature).amax(dim=1)
        still = upper > target * best
        if not bool(still.any()):
            top = target * best
            break
        failed, upper = failed.take(still), upper[still]
        if refined + len(failed) * offsets.shape[0] > budget:
            # Out of budget: the open cells keep their own bound (max over them of `upper`).
            top = max(target * best, float(upper.max()))
            break
        children = (failed.points[:, None, :] + offsets[None] * half).reshape(-1, nd)
        refined += children.shape[0]
        cells = _Frequencies(symbol, torch.cat([failed.points, children]))
        half = torch.where(deg > 0, half / 3, half)
    top = min(top, symbol.global_top) + 3 * symbol.error
    return math.sqrt(max(top, 0.0)) * (1.0 + FLOAT64_SLACK)


def symbol_bound(kernel: Tensor, grid: Shape, infinite: Tensor) -> float:
    """Exact grid max when affordable, else the continuum sup of ``infinite`` (a bound of it)."""
    g, o, c = kernel.shape[:3]
    points = _half_torus(grid).shape[0]
    if points * g * min(o, c) ** 3 <= _GRID_WORK or points <= 8 * _continuum_points(infinite):
        return _grid_sup(kernel, grid)
    return continuum_sup(infinite)
