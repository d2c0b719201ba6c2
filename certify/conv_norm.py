"""Sound float64 upper bounds of the L2 operator norm of convolutions, pooling and BatchNorm.

On import this registers (:func:`certify.bounds.register_bound`) bounds for the plain torch
modules ``nn.Conv1d``/``nn.Conv2d``, ``nn.AvgPool1d/2d``, ``nn.AdaptiveAvgPool1d/2d``,
``nn.MaxPool1d/2d``, ``nn.AdaptiveMaxPool1d/2d``, ``nn.LPPool1d/2d`` (p = 2 or inf) and
``nn.BatchNorm1d/2d`` in eval mode. A subclass that overrides ``forward`` (deel-torchlip's
``ScaledAvgPool2d`` or ``PadConv2d`` for instance) is refused with
:class:`~certify.bounds.UnboundableModuleError`, and a module with forward hooks with a
``ValueError``: the map such a module computes is not the one bounded here.

Every value is an upper bound of the Lipschitz constant of the layer as configured, computed in
float64 on CPU from the actual weights and multiplied by ``1 + FLOAT64_SLACK``. Without an input
shape it holds for every input size; with one (per sample, ``(C, H, W)`` or ``(C, L)``) it holds
for that size and is usually tighter: exact when the dense matrix is small, and within 1e-8 of
exact for reflect, replicate and circular padding up to a work limit (item 7).

Convolutions (notation per spatial axis: kernel k, dilation d, stride s, padding (l, r), input
size n, padded size n_pad = n + l + r, span K = d (k - 1) + 1):

1. Polyphase. On the infinite grid ``y[t] = sum_j W_j x[t s + j d]`` (the padding offset is a
   shift, an isometry there). Writing ``j d = q s + r`` makes this the stride-1 convolution of the
   s phases ``x_r[m] = x[m s + r]`` (a permutation of the input) with a kernel of ``ceil(K / s)``
   taps and ``c_in s`` channels: its norm equals, and is not merely bounded by, the norm of that
   stride-1 convolution. With ``g = gcd(s, d)`` only every g-th pixel is read, so (s, d) may be
   replaced by (s / g, d / g); at stride 1 the dilation drops out (``K^(w) -> K^(d w)`` keeps the
   sup). Groups make the operator block diagonal: the norm is the max over groups.
2. Every input size, zero padding. The layer is ``R T E``: E embeds the padded input in Z^nd
   (isometry), T is the convolution there, R keeps the output coordinates, so
   ``||layer|| <= ||T|| = sup_w sigma_max(K(w))``, ``K(w) = sum_q W'_q exp(-i <q, w>)`` the
   c_out x c_in' symbol. The sup over the continuous torus is certified by branch and bound. Let
   ``H(w) = sum_e A_e exp(-i <e, w>)`` be the Gram symbol on the smaller side (``K^H K`` or
   ``K K^H``; offsets ``|e_i| <= D_i = taps_i - 1``), ``lambda* = max_w lambda_max(H(w))``
   attained at w* with unit eigenvector v, and ``m = max(0, lambda_min(A_0) - sum_{e != 0}
   ||A_e||_F) <= lambda_min(H(w))``. Then ``phi(w) = v^H H(w) v`` is a real trigonometric
   polynomial with ``m <= phi <= lambda*``, ``phi(w*) = lambda*`` and ``grad phi(w*) = 0``. If a
   cell of centre c and half-widths h contains w*, the second derivative of
   ``t -> phi(w* + t (c - w*))`` is bounded (a) by Bernstein's inequality applied to
   ``phi - (lambda* + m) / 2``, a function of exponential type ``sigma = sum_i D_i h_i`` and
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
3. Known size, zero padding: put the padded input, rounded up to a multiple of s, on a circle of
   ``L = ceil(n_pad / s)`` phase samples; no window wraps, so the layer is ``R C_L E`` with C_L a
   circular convolution whose norm is exactly the max over the L-point DFT grid of sigma_max
   (Sedghi, Gupta & Long, "The Singular Values of Convolutional Layers", ICLR 2019).
4. Circular padding with ``l + r = K - 1`` on every axis is the circular convolution ``S_s C_n``
   (up to a circular shift of the input): for s | n its norm is exactly the max over the
   (n / s)-point grid of the polyphase symbol, otherwise at most ``||C_n||`` (stride 1).
5. Other padding: the layer is ``conv_valid(P x)`` where P copies input pixel i ``m_i`` times
   (``P^T P = diag(m)``), so ``||layer|| <= ||conv_valid|| sqrt(max_i m_i)``, m a product over
   axes, counted exactly for a known size. Worst case over all sizes per axis: circular and
   reflect ``1 + [l > 0] + [r > 0]``, replicate ``1 + l + r`` (an input of size 1).
6. Known size with a small dense matrix (``in_dim * out_dim <= _DENSE_ENTRIES``): the exact norm
   from :mod:`certify.exact`; this is what makes reflect / replicate / extra circular padding tight.
   A pointwise convolution (every span 1, zero or no padding) is exact without it: each output
   pixel reads one distinct input pixel or a zero pad, so the norm is the largest ``||W_g||``
   (0 when every output pixel reads a pad).
7. Known size, larger, with reflect, replicate or circular padding (where items 4 and 5 give a
   product of norms, up to ``sqrt(copies)`` loose: 2.0 for a norm of 4/3): the norm certified
   within about 1e-8 through the banded Gram matrix on the cheaper side, per group
   (:func:`certify.conv_gram.banded_gram_norm`: Lanczos estimate, then a block Cholesky
   factorisation of ``nu I - G`` with its rounding bounded), when its cost is at most
   ``_GRAM_WORK``; else item 4 or 5. Zero padding keeps item 3, which the Gram matrix would
   improve little at a much higher cost.

Pooling (separable: a 2-D window is a product of 1-D windows, and torch's divisor is a product of
per-axis lengths, so the 2-D operator is the Kronecker product of two 1-D operators and its norm
the product of theirs; per-axis matrices are taken from torch itself, never re-derived):

* average pooling: exact per-axis norms for a known size. For every size, an axis whose windows
  all carry the same weight (``divisor_override``, or ``count_include_pad`` or no padding, and no
  partial ``ceil_mode`` window) is a zero-padded 1-D convolution with a uniform kernel (item 2);
  otherwise the axis norm is bounded by the Collatz-Wielandt inequality
  ``rho(M) <= max_j (M q)_j / q_j`` for ``M = A^T A >= 0`` and ``q = M^t 1 > 0``, evaluated for every
  size up to a limit beyond which the per-pixel value repeats (see :func:`_sup_over_sizes`);
* max pooling and LP pooling with p = inf: each output is 1-Lipschitz in the window's pixels for
  the max norm, so ``||f(x) - f(y)||^2 <= sum_w ||x_w - y_w||^2 <= c ||x - y||^2`` with c the max
  number of windows containing a pixel (attained by moving that pixel alone): bound ``sqrt(c)``;
* LP pooling with p = 2: ``f_w(x) = sqrt(k_w / len_w) ||x_w||`` (torch rescales partial ceil_mode
  windows), so the same argument gives ``sqrt(max_i sum_{w ni i} k_w / len_w)``, attained at 0;
* BatchNorm in eval mode is the per-channel affine map ``gamma (x - mu) / sqrt(var + eps) + beta``:
  ``max_c |gamma_c| / sqrt(var_c + eps)`` (exact).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.bounds import FLOAT64_SLACK, UnboundableModuleError, matrix_spectral_norm, register_bound
from certify.conv_gram import banded_gram_norm, gram_work
from certify.exact import dense_operator_norm

__all__ = [
    "adaptive_avg_pool_bound",
    "adaptive_max_pool_bound",
    "avg_pool_bound",
    "batch_norm_bound",
    "configured_conv_bound",
    "conv_module_bound",
    "conv_operator_bound",
    "lp_pool_bound",
    "max_pool_bound",
]

Shape = tuple[int, ...]

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
#: Dense exact norm when the matrix has at most this many entries and its smaller side at most
#: _DENSE_SIDE (the Gram eigenproblem is cubic in that side).
_DENSE_ENTRIES = 1 << 22
_DENSE_SIDE = 1024
#: The banded Gram certificate (item 7) is used for reflect, replicate and circular padding when its
#: factorisation costs at most this much (certify.conv_gram.gram_work, summed over groups): a
#: 16-channel 3x3 convolution on 32x32 inputs (1.7e10, about 8 s of one core) fits, a 32-channel
#: one (1.4e11) does not.
_GRAM_WORK = 2 * 10**10
#: A DFT grid is used instead of the branch and bound when (points * groups * side^3) is below
#: this (about a second of LAPACK on one core) or when it has fewer points than the branch and
#: bound would start with.
_GRID_WORK = 1 << 28
#: Complex entries of Gram matrices built at once, and kept for reuse when a frequency set fits.
_CHUNK_ELEMENTS = 1 << 22
_HOLD_ELEMENTS = 1 << 24
#: Power iterations behind the Collatz-Wielandt vector of average pooling.
_COLLATZ_STEPS = 24


# ---------------------------------------------------------------------------------------------
# Argument handling


def _as_tuple(value: int | Sequence[int], nd: int, name: str) -> Shape:
    if isinstance(value, int):
        values: Shape = (value,) * nd
    else:
        values = tuple(int(v) for v in value)
        if len(values) == 1 and nd > 1:
            values = values * nd
    if len(values) != nd:
        raise ValueError(f"{name} must be an int or a sequence of {nd} ints, got {value!r}")
    return values


def _positive(values: Shape, name: str) -> Shape:
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be >= 1, got {values}")
    return values


def _spatial(input_shape: Sequence[int], nd: int, what: str) -> Shape:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < nd or any(s < 1 for s in shape):
        raise ValueError(
            f"{what}: input_shape must end with {nd} positive spatial sizes, got {input_shape!r}"
        )
    return shape[-nd:]


def _require_plain(module: nn.Module, base: type[nn.Module], methods: tuple[str, ...] = ("forward",)) -> None:
    """Refuse modules whose computation is not ``base``'s: overridden methods or forward hooks."""
    cls = type(module)
    changed = [name for name in methods if getattr(cls, name) is not getattr(base, name)]
    if changed:
        raise UnboundableModuleError(
            module,
            detail=(
                f"{cls.__module__}.{cls.__qualname__} redefines {', '.join(changed)} of {base.__name__}, so "
                f"the bound of {base.__name__} does not apply to it; register a bound for it with "
                "certify.bounds.register_bound"
            ),
        )
    if module._forward_hooks or module._forward_pre_hooks:
        raise ValueError(
            f"{cls.__name__} has forward hooks, which may change what it computes; remove them (for "
            "torch.nn.utils.spectral_norm / weight_norm use the torch.nn.utils.parametrizations versions) "
            "before bounding it"
        )


def _float64(tensor: Tensor, what: str) -> Tensor:
    value = tensor.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(value).all():
        raise ValueError(f"{what} contains NaN or Inf: no Lipschitz bound exists")
    return value


# ---------------------------------------------------------------------------------------------
# Kernels: groups, dilation, polyphase


@dataclass(frozen=True)
class _Geometry:
    """How a convolution is configured, per spatial axis."""

    kernel: Shape
    stride: Shape
    dilation: Shape
    pads: tuple[tuple[int, int], ...]
    mode: str

    @property
    def spans(self) -> Shape:
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel, strict=True))

    @property
    def padded(self) -> bool:
        return any(left or right for left, right in self.pads)

    @property
    def full_circular(self) -> bool:
        """Circular padding of ``span - 1`` on every axis: the circular convolution itself."""
        pairs = zip(self.pads, self.spans, strict=True)
        return self.mode == "circular" and all(left + right == span - 1 for (left, right), span in pairs)


def _resolve_pads(
    padding: str | int | Sequence[int], kernel: Shape, dilation: Shape, stride: Shape
) -> tuple[tuple[int, int], ...]:
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    "padding='same' is not supported for strided convolutions (torch refuses it too)"
                )
            # torch puts the odd extra pixel of 'same' padding on the right (end) side.
            totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            return tuple((t // 2, t - t // 2) for t in totals)
        raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    pads = _as_tuple(padding, nd, "padding")
    if any(p < 0 for p in pads):
        raise ValueError(f"padding must be >= 0, got {pads}")
    return tuple((p, p) for p in pads)


def _grouped(weight: Tensor, groups: int) -> Tensor:
    """``(out, in/g, *k)`` -> ``(g, out/g, in/g, *k)``: one block of the block-diagonal operator per group."""
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide out_channels={weight.shape[0]}")
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def _dilate(kernel: Tensor, dilation: Shape) -> Tensor:
    if all(d == 1 for d in dilation):
        return kernel
    taps = kernel.shape[3:]
    out = kernel.new_zeros(*kernel.shape[:3], *((t - 1) * d + 1 for t, d in zip(taps, dilation, strict=True)))
    out[(..., *(slice(None, None, d) for d in dilation))] = kernel
    return out


def _polyphase(kernel: Tensor, stride: Shape) -> Tensor:
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


def _infinite_grid_kernel(kernel: Tensor, stride: Shape, dilation: Shape) -> Tensor:
    """The stride-1 kernel whose symbol sup is the norm of the convolution on Z^nd (item 1)."""
    reduced_s, reduced_d = [], []
    for s, d in zip(stride, dilation, strict=True):
        g = math.gcd(s, d)
        reduced_s.append(s // g)
        reduced_d.append(d // g if s // g > 1 else 1)
    return _polyphase(_dilate(kernel, tuple(reduced_d)), tuple(reduced_s))


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

    def _use_coefficients(self) -> bool:
        if self.coeffs is None or self.deltas is None:
            return False
        direct = self.taps.shape[0] * self.rows * self.cols + self.rows * self.cols * self.side
        return self.deltas.shape[0] * self.side * self.side <= direct

    def matrices(self, points: Tensor) -> Tensor:
        """``H`` at ``points`` (``(P, nd)`` radians): ``(P, groups, side, side)`` complex."""
        g, s = self.groups, self.side
        if self._use_coefficients():
            phases = torch.exp(-1j * (points @ self.deltas.T))
            return (phases @ self.coeffs).reshape(-1, g, s, s)
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
    """Most cells :func:`_continuum_sup` may refine for ``symbol``.

    A cell costs a Cholesky factorisation (``side^3 / 3`` complex operations per group), the sum
    that builds ``H`` there (a few dozen ``side^2`` terms) and a fixed overhead; the weights make
    one unit about a nanosecond of one core at every side.
    """
    side = symbol.side
    return max(_MIN_REFINED, _CONTINUUM_WORK // (symbol.groups * (side**3 + 32 * side**2 + 1024)))


def _continuum_sup(kernel: Tensor) -> float:
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


def _symbol_bound(kernel: Tensor, grid: Shape, infinite: Tensor) -> float:
    """Exact grid max when affordable, else the continuum sup of ``infinite`` (a bound of it)."""
    g, o, c = kernel.shape[:3]
    points = _half_torus(grid).shape[0]
    if points * g * min(o, c) ** 3 <= _GRID_WORK or points <= 8 * _continuum_points(infinite):
        return _grid_sup(kernel, grid)
    return _continuum_sup(infinite)


# ---------------------------------------------------------------------------------------------
# Convolutions


def _conv_map(weight: Tensor, geo: _Geometry, groups: int) -> Callable[[Tensor], Tensor]:
    conv = F.conv1d if weight.ndim == 3 else F.conv2d
    flat = [p for pair in reversed(geo.pads) for p in pair]
    pad_mode = "constant" if geo.mode == "zeros" else geo.mode

    def apply(x: Tensor) -> Tensor:
        if any(flat):
            x = F.pad(x, flat, mode=pad_mode)
        return conv(x, weight, None, geo.stride, 0, geo.dilation, groups)

    return apply


def _copies(size: int, pads: tuple[int, int], mode: str) -> int:
    """Max number of times torch's padding of ``mode`` writes one input pixel, for this size."""
    index = torch.arange(size, dtype=torch.float64).reshape(1, 1, size)
    padded = F.pad(index, list(pads), mode=mode).flatten().long()
    return int(torch.bincount(padded, minlength=size).max())


def _worst_copies(pads: tuple[int, int], mode: str) -> int:
    """Max of :func:`_copies` over every size.

    Each pad side copies a pixel at most once for circular and reflect padding; replicate copies
    the single pixel of a size-1 input into all ``l + r`` pads.
    """
    left, right = pads
    if mode == "replicate":
        return 1 + left + right
    return 1 + int(left > 0) + int(right > 0)


def _all_sizes_bound(kernel: Tensor, geo: _Geometry) -> float:
    infinite = _continuum_sup(_infinite_grid_kernel(kernel, geo.stride, geo.dilation))
    if not geo.padded or geo.mode == "zeros":
        return infinite
    product = infinite * math.sqrt(math.prod(_worst_copies(p, geo.mode) for p in geo.pads))
    if not geo.full_circular:
        return product
    if all(s == 1 for s in geo.stride):
        return infinite
    # ||S_s C_n|| <= ||C_n||: the stride-1 circular convolution, for sizes the stride does not divide.
    return min(_continuum_sup(_infinite_grid_kernel(kernel, (1,) * len(geo.stride), geo.dilation)), product)


def _zero_padded_sized(kernel: Tensor, geo: _Geometry, padded: Shape) -> float:
    """Bound of the zero-padded convolution whose padded input has size ``padded`` (item 3)."""
    grid = tuple(-(-n // s) for n, s in zip(padded, geo.stride, strict=True))
    phases = _polyphase(_dilate(kernel, geo.dilation), geo.stride)
    return _symbol_bound(phases, grid, _infinite_grid_kernel(kernel, geo.stride, geo.dilation))


def _banded_exact(kernel: Tensor, geo: _Geometry, input_shape: Shape) -> float | None:
    """Item 7: the certified norm from the banded Gram matrix (max over groups), or None past its cost."""
    sizes = input_shape[1:]
    work = kernel.shape[0] * gram_work(kernel[0], geo.stride, geo.dilation, geo.pads, geo.mode, sizes)
    if work > _GRAM_WORK:
        return None
    values = [
        banded_gram_norm(
            block,
            stride=geo.stride,
            dilation=geo.dilation,
            pads=geo.pads,
            mode=geo.mode,
            input_shape=(block.shape[1], *sizes),
            max_work=_GRAM_WORK,
        )
        for block in kernel
    ]
    return None if any(v is None for v in values) else max(v for v in values if v is not None)


def _sized_bound(weight: Tensor, kernel: Tensor, geo: _Geometry, groups: int, input_shape: Shape) -> float:
    spatial = input_shape[1:]
    padded = tuple(n + left + right for n, (left, right) in zip(spatial, geo.pads, strict=True))
    if any(n < k for n, k in zip(padded, geo.spans, strict=True)):
        raise ValueError(
            f"input of spatial size {spatial} is smaller than the convolution's span {geo.spans}"
        )
    for n, (left, right) in zip(spatial, geo.pads, strict=True):
        if geo.mode == "reflect" and max(left, right) >= n:
            raise ValueError(f"reflect padding {(left, right)} needs inputs larger than it, got size {n}")
        if geo.mode == "circular" and max(left, right) > n:
            raise ValueError(f"circular padding {(left, right)} cannot exceed the input size {n}")
    out = tuple((n - k) // s + 1 for n, k, s in zip(padded, geo.spans, geo.stride, strict=True))
    if all(k == 1 for k in geo.spans) and (not geo.padded or geo.mode == "zeros"):
        reads = all(
            any(left <= o * s < left + n for o in range(m))
            for n, (left, _), s, m in zip(spatial, geo.pads, geo.stride, out, strict=True)
        )
        return max(matrix_spectral_norm(block) for block in kernel) if reads else 0.0
    in_dim = math.prod(input_shape)
    out_dim = weight.shape[0] * math.prod(out)
    if in_dim * out_dim <= _DENSE_ENTRIES and min(in_dim, out_dim) <= _DENSE_SIDE:
        return dense_operator_norm(_conv_map(weight, geo, groups), input_shape)
    if not geo.padded or geo.mode == "zeros":
        return _zero_padded_sized(kernel, geo, padded)
    dilated = _dilate(kernel, geo.dilation)
    if geo.full_circular and all(n % s == 0 for n, s in zip(spatial, geo.stride, strict=True)):
        grid = tuple(n // s for n, s in zip(spatial, geo.stride, strict=True))
        infinite = _infinite_grid_kernel(kernel, geo.stride, geo.dilation)
        return _symbol_bound(_polyphase(dilated, geo.stride), grid, infinite)
    exact = _banded_exact(kernel, geo, input_shape)
    if exact is not None:
        return exact
    copies = math.prod(_copies(n, p, geo.mode) for n, p in zip(spatial, geo.pads, strict=True))
    product = _zero_padded_sized(kernel, geo, padded) * math.sqrt(copies)
    if geo.full_circular:
        stride_one = _infinite_grid_kernel(kernel, (1,) * len(spatial), geo.dilation)
        return min(_symbol_bound(dilated, spatial, stride_one), product)
    return product


def conv_operator_bound(
    weight: Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    input_shape: Sequence[int] | None = None,
) -> float:
    """Sound float64 upper bound of the L2 operator norm of a 1-D or 2-D convolution (no bias).

    ``weight`` is ``(out, in / groups, k)`` (Conv1d) or ``(out, in / groups, kh, kw)`` (Conv2d);
    the other arguments mean what they mean for ``nn.Conv1d`` / ``nn.Conv2d`` (padding an int, a
    tuple, ``"same"`` or ``"valid"``; ``padding_mode`` one of zeros, reflect, replicate, circular).
    Without ``input_shape`` the bound holds for every input size; with it (per sample, ``(C, L)``
    or ``(C, H, W)``) for that size, exact when the dense matrix is small. The methods and their
    proofs are in the module docstring.
    """
    if weight.ndim not in (3, 4):
        raise ValueError(
            f"weight must be (out, in/groups, k) or (out, in/groups, kh, kw), got {tuple(weight.shape)}"
        )
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise ValueError(f"padding_mode must be zeros, reflect, replicate or circular, got {padding_mode!r}")
    nd = weight.ndim - 2
    w = _float64(weight, "convolution weight")
    kernel_size = tuple(w.shape[2:])
    stride_t = _positive(_as_tuple(stride, nd, "stride"), "stride")
    dilation_t = _positive(_as_tuple(dilation, nd, "dilation"), "dilation")
    geo = _Geometry(
        kernel=kernel_size,
        stride=stride_t,
        dilation=dilation_t,
        pads=_resolve_pads(padding, kernel_size, dilation_t, stride_t),
        mode=padding_mode,
    )
    kernel = _grouped(w, groups)
    if input_shape is None:
        return _all_sizes_bound(kernel, geo)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != nd + 1 or any(s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be (channels, {', '.join(['size'] * nd)}) per sample, got {input_shape!r}"
        )
    if shape[0] != w.shape[1] * groups:
        raise ValueError(
            f"input_shape has {shape[0]} channels but the convolution expects {w.shape[1] * groups}"
        )
    return _sized_bound(w, kernel, geo, groups, shape)


def conv_module_bound(conv: nn.Conv1d | nn.Conv2d, input_shape: Sequence[int] | None = None) -> float:
    """Sound bound of the Lipschitz constant of a plain ``nn.Conv1d`` / ``nn.Conv2d`` as configured.

    The bias does not change the Lipschitz constant. Parametrized weights
    (``torch.nn.utils.parametrize``) are evaluated; a subclass that overrides ``forward`` or
    ``_conv_forward`` is refused. See :func:`conv_operator_bound`.
    """
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d)):
        raise UnboundableModuleError(conv)
    _require_plain(
        conv, nn.Conv1d if isinstance(conv, nn.Conv1d) else nn.Conv2d, ("forward", "_conv_forward")
    )
    return configured_conv_bound(conv, input_shape)


def configured_conv_bound(conv: nn.Conv1d | nn.Conv2d, input_shape: Sequence[int] | None = None) -> float:
    """:func:`conv_operator_bound` of ``conv.weight`` with ``conv``'s stride, padding, dilation, groups
    and padding mode.

    Unlike :func:`conv_module_bound` it does not check that ``conv`` computes ``nn.Conv``'s
    forward: it is for callers that know it does (the library's own parametrized convolutions,
    whose forward hooks a user may add) or that bound the rest of the computation themselves.
    """
    return conv_operator_bound(
        conv.weight,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        input_shape=input_shape,
    )


# ---------------------------------------------------------------------------------------------
# Pooling: per-axis operators taken from torch itself


@dataclass(frozen=True)
class _Window:
    """One axis of a pooling window, laid out as torch lays it out."""

    kernel: int
    stride: int
    padding: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def out_size(self, n: int) -> int:
        # torch's pooling_output_shape: a ceil_mode window must start inside the input or left padding.
        extra = self.stride - 1 if self.ceil_mode else 0
        out = (n + 2 * self.padding - self.span + extra) // self.stride + 1
        if self.ceil_mode and (out - 1) * self.stride >= n + self.padding:
            out -= 1
        return out


def _windows(
    kernel_size: Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    ceil_mode: bool,
) -> tuple[_Window, ...]:
    kernel = _positive(tuple(int(k) for k in kernel_size), "kernel_size")
    nd = len(kernel)
    if nd not in (1, 2):
        raise ValueError(f"kernel_size must have 1 or 2 entries (one per spatial axis), got {kernel_size!r}")
    strides = _positive(_as_tuple(kernel if stride is None else stride, nd, "stride"), "stride")
    pads = _as_tuple(padding, nd, "padding")
    dilations = _positive(_as_tuple(dilation, nd, "dilation"), "dilation")
    windows = tuple(
        _Window(*axis, ceil_mode=ceil_mode) for axis in zip(kernel, strides, pads, dilations, strict=True)
    )
    for w in windows:
        if w.padding < 0 or 2 * w.padding > w.kernel:
            raise ValueError(f"pooling padding {pads} must be >= 0 and at most half the kernel size {kernel}")
    return windows


def _basis(n: int) -> Tensor:
    """The n one-hot inputs of one axis, as a batch of (1, n, 1) images."""
    return torch.eye(n, dtype=torch.float64).reshape(n, 1, n, 1)


def _avg_axis(n: int, w: _Window, count_include_pad: bool, summed: bool) -> Tensor:
    """torch's 1-D average pooling on size n as an ``(out, n)`` matrix (window sums if ``summed``)."""
    y = F.avg_pool2d(
        _basis(n),
        (w.kernel, 1),
        (w.stride, 1),
        (w.padding, 0),
        w.ceil_mode,
        count_include_pad,
        1 if summed else None,
    )
    return y.reshape(n, -1).T


def _max_axis(n: int, w: _Window) -> Tensor:
    """Window membership of torch's 1-D max pooling on size n as a 0/1 ``(out, n)`` matrix."""
    y = F.max_pool2d(_basis(n), (w.kernel, 1), (w.stride, 1), (w.padding, 0), (w.dilation, 1), w.ceil_mode)
    return (y.reshape(n, -1).T > 0.5).to(torch.float64)


def _sup_over_sizes(value: Callable[[int], float], reach: int, w: _Window) -> float:
    """``max over every size n >= 1 of value(n)``, for a per-pixel quantity of reach ``reach``.

    ``value(n)`` must be the max over pixels j of a quantity that depends only on the windows
    (positions and weights) meeting ``[j - reach, j + reach]``; sizes with no output are skipped.
    With ``R = reach + span + padding``: a pixel at least R from both ends sees full windows whose
    layout repeats with period ``stride``; once ``n >= 2 R + stride``, a pixel within R of the left
    end sees the same windows as for every larger n, and one within R of the right end the same
    as for ``n - stride`` relative to that end (torch's window count, ceil_mode included, grows
    by one when n grows by the stride). So every value is already taken for some
    ``n <= 2 R + 2 stride + 2``.
    """
    radius = reach + w.span + w.padding
    values = [value(n) for n in range(1, 2 * radius + 2 * w.stride + 3) if w.out_size(n) >= 1]
    return max(values)


def _axis_value(value: Callable[[int], float], w: _Window, size: int | None, reach: int) -> float:
    """``value(size)``, or its sup over every size when ``size`` is None."""
    if size is None:
        return _sup_over_sizes(value, reach, w)
    if w.out_size(size) < 1:
        raise ValueError(
            f"input size {size} is too small for a pooling window of {w.kernel} with padding {w.padding}"
        )
    return value(size)


def _collatz(matrix: Tensor) -> float:
    """Collatz-Wielandt bound of ``||matrix||^2``: ``max_j (M q)_j / q_j``, ``M = A^T A``, ``q = M^t 1``.

    Sound for any ``q > 0`` on the pixels some window covers (``M`` is zero elsewhere); the local
    vector ``M^t 1`` keeps the value a per-pixel quantity of reach ``(t + 1)`` windows.
    """
    gram = matrix.T @ matrix
    q = torch.ones(gram.shape[0], dtype=torch.float64)
    for _ in range(_COLLATZ_STEPS):
        q = gram @ q
        q = q / q.max()
    covered = q > 0
    return ((gram @ q)[covered] / q[covered]).max().item()


def avg_pool_bound(
    kernel_size: Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    spatial_shape: Sequence[int] | None = None,
) -> float:
    """Sound bound of the L2 norm of torch's average pooling (``F.avg_pool1d`` / ``F.avg_pool2d``).

    ``kernel_size`` has one entry per spatial axis (1 or 2). With ``spatial_shape`` the value is
    the exact norm (product of the exact per-axis norms, times ``1 + FLOAT64_SLACK``); without it
    it holds for every input size (see the module docstring). ``ceil_mode`` partial windows are
    divided by their clipped size, so their weights exceed ``1 / k``: ``AvgPool2d(2, ceil_mode=True)``
    has norm 1 on odd sizes, not 1/2.
    """
    windows = _windows(kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None and int(divisor_override) < 1:
        raise ValueError(f"divisor_override must be >= 1, got {divisor_override}")
    summed = divisor_override is not None
    total = 1.0 / int(divisor_override) if summed else 1.0
    sizes = None if spatial_shape is None else _spatial(spatial_shape, len(windows), "average pooling")
    for axis, w in enumerate(windows):
        if sizes is not None:
            total *= _axis_value(
                lambda n, w=w: matrix_spectral_norm(_avg_axis(n, w, count_include_pad, summed)),
                w,
                sizes[axis],
                0,
            )
        elif summed or ((count_include_pad or w.padding == 0) and not (w.ceil_mode and w.stride > 1)):
            # Every window has the same weight: a zero-padded 1-D convolution with a uniform kernel.
            line = torch.full((1, 1, 1, w.kernel), 1.0 if summed else 1.0 / w.kernel, dtype=torch.float64)
            total *= _continuum_sup(_infinite_grid_kernel(line, (w.stride,), (1,)))
        else:
            square = _sup_over_sizes(
                lambda n, w=w: _collatz(_avg_axis(n, w, count_include_pad, summed)),
                (_COLLATZ_STEPS + 2) * w.kernel,
                w,
            )
            total *= math.sqrt(square) * (1.0 + FLOAT64_SLACK)
    return total


def max_pool_bound(
    kernel_size: Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    *,
    ceil_mode: bool = False,
    spatial_shape: Sequence[int] | None = None,
) -> float:
    """Lipschitz constant (exact, times ``1 + FLOAT64_SLACK``) of torch's max pooling.

    ``sqrt(c)`` with c the largest number of windows that contain one input pixel, for
    ``spatial_shape`` or the worst over every size. Also the constant of LP pooling with p = inf.
    """
    windows = _windows(kernel_size, stride, padding, dilation, ceil_mode)
    sizes = None if spatial_shape is None else _spatial(spatial_shape, len(windows), "max pooling")
    count = 1.0
    for axis, w in enumerate(windows):
        count *= _axis_value(
            lambda n, w=w: _max_axis(n, w).sum(0).max().item(), w, None if sizes is None else sizes[axis], 0
        )
    return math.sqrt(count) * (1.0 + FLOAT64_SLACK)


def lp_pool_bound(
    norm_type: float,
    kernel_size: Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    ceil_mode: bool = False,
    spatial_shape: Sequence[int] | None = None,
) -> float:
    """Lipschitz constant (exact, times ``1 + FLOAT64_SLACK``) of torch's LP pooling, p = 2 or inf.

    p = 2: torch computes ``sqrt(k / len_w * sum_{i in w} x_i^2)`` per window (``k / len_w > 1`` for a
    partial ceil_mode window), so the constant is ``sqrt(max_i sum_{w ni i} k / len_w)``. p = inf is
    max pooling of ``|x|``. Other p are refused: for odd p torch's formula is not even continuous.
    """
    p = float(norm_type)
    if p == math.inf:
        return max_pool_bound(kernel_size, stride, 0, 1, ceil_mode=ceil_mode, spatial_shape=spatial_shape)
    if p != 2.0:
        raise ValueError(f"only LP pooling with norm_type 2 or inf has a bound here, got {norm_type!r}")
    windows = _windows(kernel_size, stride, 0, 1, ceil_mode)
    sizes = None if spatial_shape is None else _spatial(spatial_shape, len(windows), "LP pooling")
    total = 1.0
    for axis, w in enumerate(windows):
        total *= _axis_value(
            lambda n, w=w: (w.kernel * _avg_axis(n, w, True, False).sum(0)).max().item(),
            w,
            None if sizes is None else sizes[axis],
            0,
        )
    return math.sqrt(total) * (1.0 + FLOAT64_SLACK)


def _adaptive_sizes(
    output_size: Sequence[int | None], spatial_shape: Sequence[int] | None, what: str
) -> list[tuple[int, int]]:
    if spatial_shape is None:
        raise ValueError(
            f"{what} has no bound that holds for every input size (an output larger than the input repeats "
            "pixels); pass input_shape to lipschitz_bound"
        )
    sizes = _spatial(spatial_shape, len(output_size), what)
    pairs = [(n, n if o is None else int(o)) for n, o in zip(sizes, output_size, strict=True)]
    if any(o < 1 for _, o in pairs):
        raise ValueError(f"{what}: output sizes must be >= 1, got {tuple(output_size)}")
    return pairs


def adaptive_avg_pool_bound(output_size: Sequence[int | None], spatial_shape: Sequence[int] | None) -> float:
    """Exact norm (times ``1 + FLOAT64_SLACK``) of torch's adaptive average pooling for one input size.

    ``output_size`` has one entry per spatial axis (None keeps the input size). There is no bound
    for every size, so ``spatial_shape`` is required.
    """
    total = 1.0
    for n, o in _adaptive_sizes(output_size, spatial_shape, "adaptive average pooling"):
        total *= matrix_spectral_norm(F.adaptive_avg_pool2d(_basis(n), (o, 1)).reshape(n, -1).T)
    return total


def adaptive_max_pool_bound(output_size: Sequence[int | None], spatial_shape: Sequence[int] | None) -> float:
    """Lipschitz constant (exact, times ``1 + FLOAT64_SLACK``) of torch's adaptive max pooling.

    ``sqrt(c)``, c the largest number of windows containing one pixel; ``spatial_shape`` is required.
    """
    count = 1.0
    for n, o in _adaptive_sizes(output_size, spatial_shape, "adaptive max pooling"):
        member = F.adaptive_max_pool2d(_basis(n), (o, 1)).reshape(n, -1) > 0.5
        count *= member.sum(1).max().item()
    return math.sqrt(count) * (1.0 + FLOAT64_SLACK)


# ---------------------------------------------------------------------------------------------
# BatchNorm


def batch_norm_bound(module: nn.BatchNorm1d | nn.BatchNorm2d) -> float:
    """Exact Lipschitz constant (times ``1 + FLOAT64_SLACK``) of a BatchNorm layer in eval mode.

    In eval mode with running statistics the layer is ``gamma_c (x - mu_c) / sqrt(var_c + eps) + beta_c``
    per channel: the constant is ``max_c |gamma_c| / sqrt(var_c + eps)``. In training mode (or without
    running statistics) it normalises with batch statistics and couples the samples: ValueError.
    """
    name = type(module).__name__
    if module.training:
        raise ValueError(
            f"{name} is in training mode, where it normalises with batch statistics; call model.eval() first"
        )
    if module.running_var is None:
        raise ValueError(
            f"{name} has track_running_stats=False, so it uses batch statistics even in eval mode"
        )
    var = _float64(module.running_var, f"{name}.running_var")
    if (var < 0).any():
        raise ValueError(f"{name}.running_var has negative entries")
    gamma = _float64(module.weight, f"{name}.weight") if module.weight is not None else torch.ones_like(var)
    scale = gamma.abs() / torch.sqrt(var + float(module.eps))
    if not torch.isfinite(scale).all():
        raise ValueError(f"{name} divides by zero (running_var + eps == 0)")
    return scale.max().item() * (1.0 + FLOAT64_SLACK)


# ---------------------------------------------------------------------------------------------
# Registration for plain torch modules


def _dims(module: nn.Module, one_d: type[nn.Module]) -> int:
    return 1 if isinstance(module, one_d) else 2


def _spatial_or_none(input_shape: Sequence[int] | None, nd: int, what: str) -> Shape | None:
    return None if input_shape is None else _spatial(input_shape, nd, what)


def _avg_pool_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    nd = _dims(module, nn.AvgPool1d)
    _require_plain(module, nn.AvgPool1d if nd == 1 else nn.AvgPool2d)
    return avg_pool_bound(
        _as_tuple(module.kernel_size, nd, "kernel_size"),
        module.stride,
        module.padding,
        ceil_mode=bool(module.ceil_mode),
        count_include_pad=bool(module.count_include_pad),
        divisor_override=getattr(module, "divisor_override", None),
        spatial_shape=_spatial_or_none(input_shape, nd, type(module).__name__),
    )


def _max_pool_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    nd = _dims(module, nn.MaxPool1d)
    _require_plain(module, nn.MaxPool1d if nd == 1 else nn.MaxPool2d)
    return max_pool_bound(
        _as_tuple(module.kernel_size, nd, "kernel_size"),
        module.stride,
        module.padding,
        module.dilation,
        ceil_mode=bool(module.ceil_mode),
        spatial_shape=_spatial_or_none(input_shape, nd, type(module).__name__),
    )


def _lp_pool_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    nd = _dims(module, nn.LPPool1d)
    _require_plain(module, nn.LPPool1d if nd == 1 else nn.LPPool2d)
    return lp_pool_bound(
        module.norm_type,
        _as_tuple(module.kernel_size, nd, "kernel_size"),
        module.stride,
        ceil_mode=bool(module.ceil_mode),
        spatial_shape=_spatial_or_none(input_shape, nd, type(module).__name__),
    )


def _adaptive_output(module: nn.Module, nd: int) -> tuple[int | None, ...]:
    size = module.output_size
    return (size,) * nd if size is None or isinstance(size, int) else tuple(size)


def _adaptive_avg_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    nd = _dims(module, nn.AdaptiveAvgPool1d)
    _require_plain(module, nn.AdaptiveAvgPool1d if nd == 1 else nn.AdaptiveAvgPool2d)
    return adaptive_avg_pool_bound(_adaptive_output(module, nd), input_shape)


def _adaptive_max_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    nd = _dims(module, nn.AdaptiveMaxPool1d)
    _require_plain(module, nn.AdaptiveMaxPool1d if nd == 1 else nn.AdaptiveMaxPool2d)
    return adaptive_max_pool_bound(_adaptive_output(module, nd), input_shape)


def _batch_norm_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    _require_plain(module, nn.BatchNorm1d if isinstance(module, nn.BatchNorm1d) else nn.BatchNorm2d)
    return batch_norm_bound(module)


for _conv in (nn.Conv1d, nn.Conv2d):
    register_bound(_conv, conv_module_bound)
for _pair, _fn in (
    ((nn.AvgPool1d, nn.AvgPool2d), _avg_pool_module),
    ((nn.MaxPool1d, nn.MaxPool2d), _max_pool_module),
    ((nn.LPPool1d, nn.LPPool2d), _lp_pool_module),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), _adaptive_avg_module),
    ((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d), _adaptive_max_module),
    ((nn.BatchNorm1d, nn.BatchNorm2d), _batch_norm_module),
):
    for _cls in _pair:
        register_bound(_cls, _fn)
