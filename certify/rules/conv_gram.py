"""Exact L2 norm of a convolution on one input size, certified through its banded Gram matrix.

:func:`banded_gram_norm` returns, for one group of a 1-D or 2-D convolution (any stride, dilation,
padding and padding mode) on inputs of a given size, an upper bound of its operator norm that is
within about ``1e-8`` relative of the exact value, or ``None`` when the computation would cost
more than a given work limit or the certificate does not close. :mod:`certify.rules.conv` uses it
where its structured bounds are loose (reflect, replicate and circular padding).

Notation: the layer is the matrix A (``out_dim x in_dim``); the Gram matrix G is ``A^T A`` (the
input side) or ``A A^T`` (the output side), ``||A||^2 = lambda_max(G)``.

1. Locality. Per spatial axis, ``reads[o, q]`` counts the taps of output o that read input pixel q
   (torch's own padding of an index vector says which pixel a padded position copies, so every
   padding mode is covered). Two input pixels interact in ``A^T A`` only if some output window reads
   both, on every axis (the window and the padding are products over axes): the input-side
   adjacency is the product of the per-axis patterns ``reads^T reads > 0``, the output-side one
   that of ``reads reads^T > 0``. On an axis whose adjacency spans at most ``h`` positions, blocks
   of ``h`` consecutive positions (all channels, all positions of the other axes) make G block
   tridiagonal; circular padding, whose adjacency wraps around, gets two blocks.
2. Building G. Per axis the pixels are coloured so that no pixel is adjacent to two pixels of one
   colour (greedy colouring of the square of the adjacency); a probe is the indicator of one
   colour in one channel. ``G @ probe`` at pixel i is then ``G[i, j]`` for the one pixel j of that
   colour and channel adjacent to i, because every other term is a product with an exact zero. So
   ``colours * channels`` applications of G (a convolution and its adjoint, by autograd, in
   float64) give every nonzero entry. Rounding: each entry comes from inner products of at most
   ``m1 = c_in K`` and ``m2 = c_out K copies`` terms (K taps, ``copies`` the largest number of
   padded positions that copy one pixel), so ``|G_computed - G| <= gamma_(m1 + m2) B^T B``
   entrywise (``B B^T`` on the output side), B the layer with kernel ``|W|`` (``B >= |A|``: it adds
   the taps that read one pixel without cancellation), and ``||B^T B||_2 <= ||B||_1 ||B||_inf``
   (column and row sums, at most ``copies max_b sum_(a, taps) |W|`` and ``max_a sum_(b, taps) |W|``):
   the term ``e_G``. The factorisation reads the lower triangle; the symmetric matrix it defines is
   within the same entrywise bound of G.
3. Estimate. Lanczos with full reorthogonalisation, on the same matrix-free G, gives the top
   Ritz value theta and its residual r (``beta_k |s_k|``). This is only a guess.
4. Certificate. For ``nu = theta (1 + rho) + r`` (rho = 1e-9, else 1e-6, 1e-3), the block
   Cholesky factorisation of ``S = nu I - G_computed`` (diagonal blocks by LAPACK, the coupling
   ``X = E L^-T`` by triangular solves, ``D - X X^T`` by a product: a reordering of the inner
   products of the plain algorithm, with no fill outside the blocks) either fails, and the next rho
   is tried, or completes. Then ``R^T R = S + Delta`` with ``|Delta| <= gamma_(n+1) |R^T| |R|``
   (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm. 10.3; it holds for any
   order of the inner products), so ``lambda_min(S) >= -gamma_(n+1) ||R||_F^2`` and::

       ||A||^2 <= nu + gamma_(n+1) ||R||_F^2 + u (nu + max_i |G_ii|) + e_G,

   the third term for the rounding of ``nu - G_ii``. ``||R||_F^2`` is computed from the factor
   (doubled for the rounding of that sum). The returned value is the root times
   ``1 + FLOAT64_SLACK``.

Cost: ``colours * channels`` convolution pairs, up to a few hundred Lanczos steps (one pair each)
and ``blocks * block^3`` for one factorisation (block ``h * channels * (other sizes)``): for a
16-channel 3x3 convolution on 32x32 inputs, 400 probes and 16 blocks of 1024, about 8 s of one core
(:func:`gram_work` is the factorisation's share, and the caller's limit). Memory is held to
``_LANCZOS_STEPS * dim + probes * dim`` floats by the size limits (``_MAX_DIM``, ``_MAX_RESPONSES``).

Proof: ``docs/proofs/numerics.md#lemma-conv-gram``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from certify.contract import FLOAT64_SLACK, Shape

__all__ = ["banded_gram_norm", "gram_work", "padding_copies"]


#: Unit roundoff of float64.
_U = 2.0**-53
#: Relative margins above the Lanczos estimate at which the certificate is tried, in order.
_MARGINS = (1e-9, 1e-6, 1e-3)
#: Lanczos: most steps, steps between convergence checks, and the residual (relative to the Ritz
#: value) at which it stops.
_LANCZOS_STEPS = 400
_LANCZOS_CHECK = 10
_LANCZOS_RTOL = 1e-11
#: Probes pushed through G at once (memory: this many inputs and outputs of the layer).
_PROBE_BATCH = 256
#: Limits beyond which the method is not tried (infinite work): sizes per axis (the per-axis
#: adjacency and colouring are dense ``n x n``), the side of G (the Lanczos basis holds
#: ``_LANCZOS_STEPS * dim`` floats) and the probe responses (``probes * dim`` floats).
_MAX_AXIS = 1024
_MAX_DIM = 1 << 16
_MAX_RESPONSES = 1 << 25
#: Work charged per block on top of ``block^3`` (the Python loop and the gathers of one block).
_BLOCK_OVERHEAD = 1 << 17


def _gamma(n: int) -> float:
    return n * _U / (1.0 - n * _U)


def _axis_reads(
    size: int, kernel: int, stride: int, dilation: int, pads: tuple[int, int], mode: str
) -> Tensor:
    """``(out, size)`` counts: how many taps of output o read input pixel q on this axis."""
    index = torch.arange(size, dtype=torch.float64).reshape(1, 1, size)
    if mode == "zeros":
        padded = F.pad(index, list(pads), value=-1.0)
    else:
        padded = F.pad(index, list(pads), mode=mode)
    source = padded.flatten().long()
    out = (source.numel() - dilation * (kernel - 1) - 1) // stride + 1
    positions = torch.arange(out)[:, None] * stride + torch.arange(kernel)[None, :] * dilation
    pixels = source[positions]  # (out, kernel); -1 is a zero pad
    reads = torch.zeros((out, size + 1), dtype=torch.float64)
    reads.scatter_add_(1, torch.where(pixels < 0, size, pixels), torch.ones_like(pixels, dtype=torch.float64))
    return reads[:, :size]


def padding_copies(size: int, pads: tuple[int, int], mode: str) -> int:
    """Largest number of padded positions that copy one input pixel on this axis."""
    if mode == "zeros":
        return 1
    index = torch.arange(size, dtype=torch.float64).reshape(1, 1, size)
    source = F.pad(index, list(pads), mode=mode).flatten().long()
    return int(torch.bincount(source, minlength=size).max())


def _colouring(adjacent: Tensor) -> Tensor:
    """Colours such that no vertex is adjacent to two vertices of one colour (greedy, in order)."""
    n = adjacent.shape[0]
    conflict = (adjacent.to(torch.float64) @ adjacent.to(torch.float64)) > 0
    colours = torch.full((n,), -1, dtype=torch.long)
    for i in range(n):
        taken = set(colours[conflict[i]].tolist())
        colours[i] = next(c for c in range(n + 1) if c not in taken)
    return colours


def _span(adjacent: Tensor) -> int:
    """Largest ``|i - j|`` over adjacent pairs (at least 1): the block height."""
    i, j = torch.nonzero(adjacent, as_tuple=True)
    return max(1, int((i - j).abs().max())) if i.numel() else 1


class _Side:
    """One side of the Gram matrix: its per-axis adjacency, colouring and block layout."""

    def __init__(self, channels: int, adjacency: list[Tensor]) -> None:
        self.channels = channels
        self.sizes = tuple(a.shape[0] for a in adjacency)
        self.adjacency = adjacency
        self.dim = channels * math.prod(self.sizes)
        heights = [_span(a) for a in adjacency]
        # Block along the axis that gives the cheapest factorisation.
        costs = []
        for n, h in zip(self.sizes, heights, strict=True):
            block = min(h, n) * self.dim // n
            costs.append((-(-n // min(h, n))) * (block**3 + _BLOCK_OVERHEAD))
        self.axis = min(range(len(costs)), key=costs.__getitem__)
        self.height = min(heights[self.axis], self.sizes[self.axis])
        # Per flat spatial position its colour (product of the per-axis colours), and their count.
        per_axis = [_colouring(a) for a in adjacency]
        counts = [int(c.max()) + 1 for c in per_axis]
        flat = torch.zeros(self.sizes, dtype=torch.long)
        for axis, c in enumerate(per_axis):
            shape = [1] * len(self.sizes)
            shape[axis] = -1
            flat = flat * counts[axis] + c.reshape(shape)
        self.colour, self.n_colours = flat.flatten(), math.prod(counts)
        fits = self.dim <= _MAX_DIM and self.n_colours * channels * self.dim <= _MAX_RESPONSES
        self.work = float(costs[self.axis]) if fits else math.inf

    def blocks(self) -> list[Tensor]:
        """Flat indices (channel-major layout ``(c, *sizes)``) of each block, in order."""
        n = self.sizes[self.axis]
        grid = torch.arange(self.dim).reshape(self.channels, *self.sizes)
        return [
            grid.narrow(1 + self.axis, start, min(self.height, n - start)).flatten()
            for start in range(0, n, self.height)
        ]

    def positions(self, index: Tensor) -> list[Tensor]:
        """Per axis, the spatial coordinate of each flat index."""
        rest = index % math.prod(self.sizes)
        coords = []
        for n in reversed(self.sizes):
            coords.append(rest % n)
            rest = rest // n
        return coords[::-1]


def _operators(
    weight: Tensor,
    stride: Shape,
    dilation: Shape,
    pads: Sequence[tuple[int, int]],
    mode: str,
    in_shape: Shape,
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], Shape]:
    """The convolution A and its adjoint (by autograd) on batches, and the per-sample output shape."""
    conv = F.conv1d if weight.ndim == 3 else F.conv2d
    flat = [p for pair in reversed(pads) for p in pair]
    pad_mode = "constant" if mode == "zeros" else mode

    def forward(x: Tensor) -> Tensor:
        if any(flat):
            x = F.pad(x, flat, mode=pad_mode)
        return conv(x, weight, None, stride, 0, dilation)

    out_shape = tuple(forward(torch.zeros((1, *in_shape), dtype=torch.float64)).shape[1:])

    def adjoint(y: Tensor) -> Tensor:
        with torch.enable_grad():
            x = torch.zeros((y.shape[0], *in_shape), dtype=torch.float64, requires_grad=True)
            return torch.autograd.grad(forward(x), x, grad_outputs=y)[0]

    return forward, adjoint, out_shape


def _sides(
    weight: Tensor, stride: Shape, dilation: Shape, pads: Sequence[tuple[int, int]], mode: str, sizes: Shape
) -> tuple[_Side, _Side, int, bool] | None:
    """Input and output sides, the largest number of padded positions that copy one pixel, and
    whether any output reads an input pixel (else the layer is zero: every window reads pads);
    None when an axis is longer than ``_MAX_AXIS``."""
    axes = list(zip(sizes, weight.shape[2:], stride, dilation, pads, strict=True))
    if any(n + left + right > _MAX_AXIS for n, _, _, _, (left, right) in axes):
        return None
    reads = [_axis_reads(n, k, s, d, p, mode) for n, k, s, d, p in axes]
    copies = math.prod(padding_copies(n, p, mode) for n, _, _, _, p in axes)
    inputs = _Side(weight.shape[1], [(r.T @ r) > 0 for r in reads])
    outputs = _Side(weight.shape[0], [(r @ r.T) > 0 for r in reads])
    return inputs, outputs, copies, all(bool(r.any()) for r in reads)


def gram_work(
    weight: Tensor, stride: Shape, dilation: Shape, pads: Sequence[tuple[int, int]], mode: str, sizes: Shape
) -> float:
    """``blocks * (block^3 + _BLOCK_OVERHEAD)`` of the cheaper side of :func:`banded_gram_norm` (its
    dominant cost), infinite past the size limits (``_MAX_AXIS``, ``_MAX_DIM``, ``_MAX_RESPONSES``)."""
    sides = _sides(weight, stride, dilation, pads, mode, sizes)
    return math.inf if sides is None else min(sides[0].work, sides[1].work)


def _lanczos(apply: Callable[[Tensor], Tensor], dim: int) -> tuple[float, float]:
    """Top Ritz value of the symmetric PSD map ``apply`` and its residual norm (a guess, no guarantee)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(dim, generator=gen, dtype=torch.float64)
    v = v / v.norm()
    steps = min(dim, _LANCZOS_STEPS)
    basis = torch.zeros((steps, dim), dtype=torch.float64)
    alphas: list[float] = []
    betas: list[float] = []
    theta, residual = 0.0, math.inf
    for k in range(steps):
        basis[k] = v
        w = apply(v)
        alphas.append(float(w @ v))
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - basis[: k + 1].T @ (basis[: k + 1] @ w)
        beta = float(w.norm())
        done = k + 1 == steps or beta <= 1e-14 * max(abs(a) for a in alphas)
        if done or (k + 1) % _LANCZOS_CHECK == 0:
            t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if betas:
                off = torch.tensor(betas, dtype=torch.float64)
                t = t + torch.diag(off, 1) + torch.diag(off, -1)
            values, vectors = torch.linalg.eigh(t)
            theta, residual = float(values[-1]), beta * float(vectors[-1, -1].abs())
            if done or residual <= _LANCZOS_RTOL * abs(theta):
                break
        betas.append(beta)
        v = w / beta
    return theta, residual


def _certify(
    diagonal: Callable[[int], Tensor], coupling: Callable[[int], Tensor], count: int, nu: float
) -> float | None:
    """``||R||_F^2`` of the block Cholesky factor of ``nu I - G`` (G block tridiagonal), or None."""
    previous: Tensor | None = None
    frobenius = 0.0
    for i in range(count):
        block = -diagonal(i)
        block.diagonal().add_(nu)
        if previous is not None:
            # X = E L^-T with E = -G[i, i-1]: solve L X^T = E^T.
            x = torch.linalg.solve_triangular(previous, -coupling(i).T, upper=False).T
            block = block - x @ x.T
            frobenius += float((x * x).sum())
        factor, info = torch.linalg.cholesky_ex(block)
        if int(info) != 0:
            return None
        frobenius += float((factor * factor).sum())
        previous = factor
    return frobenius if math.isfinite(frobenius) else None


def banded_gram_norm(
    weight: Tensor,
    *,
    stride: Shape,
    dilation: Shape,
    pads: Sequence[tuple[int, int]],
    mode: str,
    input_shape: Shape,
    max_work: float,
) -> float | None:
    """Certified L2 norm of one group of a convolution on ``input_shape``, within about 1e-8 of exact.

    ``weight`` is float64 ``(out, in, *k)`` (1 or 2 spatial axes; one group); ``pads`` the
    ``(left, right)`` padding per axis, ``mode`` torch's padding mode (zeros, reflect, replicate,
    circular); ``input_shape`` ``(in, *sizes)``. Returns ``sqrt(bound of lambda_max(G)) * (1 +
    FLOAT64_SLACK)`` (module docstring), or None when :func:`gram_work` exceeds ``max_work`` or no
    margin closes the certificate; 0 when the layer is zero (a zero kernel, or windows that read only
    zero pads).
    """
    sizes = tuple(input_shape[1:])
    sides = _sides(weight, stride, dilation, pads, mode, sizes)
    if sides is None:
        return None
    inputs, outputs, copies, reads = sides
    if not (reads and bool(weight.any())):
        return 0.0
    side = inputs if inputs.work <= outputs.work else outputs
    if side.work > max_work:
        return None
    forward, adjoint, out_shape = _operators(weight, stride, dilation, pads, mode, tuple(input_shape))
    shape = tuple(input_shape) if side is inputs else out_shape
    first, second = (forward, adjoint) if side is inputs else (adjoint, forward)

    def gram(x: Tensor) -> Tensor:
        return second(first(x.reshape(-1, *shape))).reshape(x.shape[0], -1)

    # Every nonzero entry of G from colours * channels probes (item 2 of the module docstring).
    colour, n_colours = side.colour, side.n_colours
    spatial = math.prod(side.sizes)
    probe_of = torch.arange(side.dim) // spatial * n_colours + colour.repeat(side.channels)
    n_probes = side.channels * n_colours
    responses = torch.empty((n_probes, side.dim), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n_probes, _PROBE_BATCH):
            ids = torch.arange(start, min(start + _PROBE_BATCH, n_probes))
            probes = (probe_of[None, :] == ids[:, None]).to(torch.float64)
            responses[ids] = gram(probes)

    blocks = side.blocks()
    coords = [side.positions(b) for b in blocks]

    def entries(i: int, j: int) -> Tensor:
        rows, cols = blocks[i], blocks[j]
        values = responses[probe_of[cols][None, :], rows[:, None]]
        for axis, adjacency in enumerate(side.adjacency):
            values = values * adjacency[coords[i][axis][:, None], coords[j][axis][None, :]]
        return values

    with torch.no_grad():
        theta, residual = _lanczos(lambda v: gram(v[None])[0], side.dim)
    if not (math.isfinite(theta) and theta > 0):
        return None
    abs_w = weight.abs()
    taps = math.prod(weight.shape[2:])
    column = copies * float(abs_w.sum(dim=(0, *range(2, weight.ndim))).max())
    row = float(abs_w.sum(dim=tuple(range(1, weight.ndim))).max())
    terms = weight.shape[1] * taps + weight.shape[0] * taps * copies
    gram_error = _gamma(terms + 2) * column * row
    largest_diagonal = float(responses[probe_of, torch.arange(side.dim)].abs().max())
    for margin in _MARGINS:
        nu = theta * (1.0 + margin) + residual
        frobenius = _certify(lambda i: entries(i, i), lambda i: entries(i, i - 1), len(blocks), nu)
        if frobenius is not None:
            top = nu + _gamma(side.dim + 1) * 2 * frobenius + _U * (nu + largest_diagonal) + gram_error
            return math.sqrt(top) * (1.0 + FLOAT64_SLACK)
    return None
