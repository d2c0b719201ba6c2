"""Convex Potential Layers (CPL), dense and convolutional, with a sound step size.

Meunier, Delattre, Araujo & Allauzen, "A Dynamical System Perspective for Lipschitz Neural
Networks", ICML 2022. For ``W`` of shape ``(n, m)``, a bias ``b`` and any
``h >= ||W||_2``, the block

    y = x - (2 / h^2) W relu(W^T x + b)

(an explicit gradient step on the convex potential ``x -> sum relu-integral(W^T x + b)``) is
1-Lipschitz. Proof: ``relu(u) - relu(v) = S (u - v)`` with ``S`` diagonal in ``[0, 1]``, so
``y - y' = (I - (2 / h^2) W S W^T)(x - x')``; ``W S W^T`` has eigenvalues in ``[0, ||W||^2]`` and the
matrix in ``[1 - 2 ||W||^2 / h^2, 1] ⊂ [-1, 1]``. A larger ``h`` only shrinks the step, so **any
upper bound** of ``||W||_2`` keeps the layer 1-Lipschitz, while the power-iteration estimate of the
reference code is a lower bound that can make it expansive. The layer is 1-Lipschitz, not
orthogonal. Guard: ``h^2`` is floored at ``eps > 0`` (a larger ``h`` again), so ``W -> 0`` gives a
vanishing update instead of ``0 / 0``.

Step norm ``h^2`` (cached in eval mode, as is the rescaled weight ``(2 / h^2) W``):

* dense: the Gram iteration bound :func:`~lipnet.layers.bjorck.gram_norm_bound` of the smaller
  Gram matrix of ``W`` (Delattre et al., ICML 2023): ``||W||^2 <= ||G^(2^p)||_F^(1 / 2^p)``,
  computed in the layer's dtype and differentiated through.
* convolution (zero 'same' padding, odd kernel ``k``, stride 1): ``h`` is the amortised bound
  :class:`AmortisedSymbolBound` of ``||T|| = sup_w sigma_max(K(w))``, the norm of the convolution
  on the infinite grid, which bounds the zero-padded operator for every input size (it is a
  restriction of the infinite-grid one; Sedghi, Gupta & Long, ICLR 2019, for the circular case).

Grid bound (the expensive, tight one). Let ``H(w) = K(w)^H K(w)`` be the Gram symbol (offsets up
to ``k - 1`` per axis), ``lambda* = max_w lambda_max(H(w))`` attained at ``w*`` with unit
eigenvector ``v``. Then ``phi(w) = v^H H(w) v`` satisfies ``0 <= phi <= lambda*``,
``phi(w*) = lambda*``, ``grad phi(w*) = 0``. On the segment from ``w*`` to the nearest point ``c``
of an ``N x N`` DFT grid (half-widths ``pi / N``), ``phi`` is a trigonometric polynomial of
exponential type at most ``sigma = 2 (k - 1) pi / N``; Bernstein's inequality applied to
``phi - lambda* / 2`` bounds its second derivative by ``sigma^2 lambda* / 2``, so
``lambda_max(H(c)) >= phi(c) >= lambda* (1 - sigma^2 / 4)`` and
``lambda* <= max_grid lambda_max(H) / (1 - sigma^2 / 4)`` (``sigma < 2``). ``H(-w) = conj(H(w))``,
so half the grid suffices. A ``1 x 1`` kernel has a constant symbol: one frequency gives the exact
norm (``sigma = 0``).

Evaluating the grid (float64, ``n`` the smaller channel count). ``H(w) = sum_s A_s exp(i <s, w>)``
with the autocorrelation ``A_s[i, j] = sum_o sum_(t - t' = s) W[o, i, t] W[o, j, t']`` (offsets
``|s_a| <= k_a - 1``): one Gram matrix of the ``c_out x (c_in k_h k_w)`` reshaped kernel and one
product with the phases give every ``H(c)``, instead of one ``n x n`` product per frequency. Four
power-iteration steps rank the frequencies (this affects the cost only); ``eigvalsh`` gives
``lambda_max`` at the top four, ``lambda_b`` the largest, and every other frequency is certified by
a Cholesky factorisation of ``t I - H(c)``, ``t = (1 + 1e-6) lambda_b``. If it completes in floating
point, the computed factor satisfies ``R^H R = t I - H + E`` with ``|E| <= gamma_(n+1) |R^H| |R|``
(Higham, "Accuracy and Stability of Numerical Algorithms", 2002, Thm 10.3), and
``|| |R^H| |R| ||_2 <= ||R||_F^2 = tr(t I - H + E) <= n t + n ||E||_2``, so
``lambda_max(H(c)) <= t + ||E||_2 <= t (1 + 4 (n + 1)^2 eps)`` (eight times the real-arithmetic
constant ``n (n + 1) u``, ``u = eps / 2``, a margin for complex arithmetic); where it breaks down
``eigvalsh`` computes the value. The grid maximum is at most the largest computed value or ``t``
(the one used), whatever the ranking. Rounding of ``H`` itself: ``R^T R`` is off by at most
``gamma_m |R|^T |R|`` entrywise, and each entry of ``A_s`` and ``H(c)`` takes at most
``k_h k_w + (2 k_h - 1)(2 k_w - 1) + 2 <= 8 k_h k_w + 4`` further roundings, so with
``|| |X|^T |Y| ||_2 <= ||X||_F ||Y||_F`` the computed ``H(c)`` is within
``(m + 8 k_h k_w + 4) u k_h k_w ||W||_F^2`` of the exact one, while
``max_c lambda_max(H(c)) >= ||W||_F^2 / n`` (Parseval: the grid mean of ``tr H(c)`` is
``||W||_F^2`` for ``N >= k``). The bound is therefore multiplied by the allowance
``1 + eps (4 (n + 1)^2 + (m + 8 k_h k_w + 4) k_h k_w n)`` (``m`` the larger channel count; below
``1e-10`` for ``c = 128``), and ``h0`` by ``1 + FLOAT64_SLACK`` on top, for ``eigvalsh``'s backward
error and the square root. A factorisation costs a fraction of an ``eigvalsh``.

Amortisation (the cheap bound used at every step). Keep an anchor kernel ``W0`` and
``h0 >= ||T_W0||`` from the grid bound. The symbol is linear in the kernel, so by the triangle
inequality ``||T_W|| <= ||T_W0|| + ||T_(W - W0)|| <= h0 + delta`` with the reshaped-kernel bound
``||T_D|| <= sqrt(k_h k_w) ||D_r||_2`` (``D_r`` the ``c_out x (c_in k_h k_w)`` matrix:
``K_D(w) = D_r (I (x) e(w))`` with ``e(w)`` the column of ``k_h k_w`` phases, of norm
``sqrt(k_h k_w)``), ``||D_r||_2`` bounded by the Gram iteration. This costs ``c^2 k_h k_w c``
instead of ``N^2 c^3`` and holds for every ``W``, whatever ``W0`` is. The anchor moves (and the
grid bound is recomputed) when ``h0 + delta`` exceeds ``(1 + drift_tol) sqrt(grid_factor)
Re(u^H K_W(c*) v)``, with ``c*, u, v`` the grid frequency and top singular vectors that set
``h0``: ``|u^H K v| <= sigma_max(K)``, so that quantity is a lower bound of the grid bound of the
*current* weight, exact to first order in ``W - W0`` (``sigma_max`` moves by ``Re(u^H K_D v)`` to
first order). Hence ``h`` stays within ``1 + drift_tol`` of the grid bound of the current weight,
and the anchor stays put while the norm grows along its top singular direction, where
``h0 + delta`` is tight. On Adam runs ``delta`` is within about 10% of the exact drift norm
``||T_(W - W0)||``: what forces refreshes is the triangle inequality (a drift orthogonal to the
top singular vectors adds its full norm), not the reshaped-kernel bound. The gradient of ``h`` is
the gradient of the grid bound at the anchor (see the class).

``lipschitz_bound()`` rechecks the step in float64 from the actual weights: with ``a`` a sound
float64 bound of ``||W||_2`` (exact SVD for the dense layer,
:func:`certify.rules.conv.conv_operator_bound` for the convolution) and the ``h^2`` the forward pass
uses, the Lipschitz constant is at most ``max(1, 2 a^2 / h^2 - 1)``.

Proofs: ``docs/proofs/residual-blocks.md#lemma-cpl``, ``docs/proofs/frequency-bounds.md``
(``#lemma-grid-continuity``, ``#lemma-amortised-bound``) and ``docs/proofs/numerics.md#lemma-cholesky``.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor, nn

from certify.contract import FLOAT64_SLACK, matrix_spectral_norm
from certify.rules.conv import conv_operator_bound
from lipnet.layers.bjorck import gram_norm_bound
from lipnet.layers.gradient_step import GradientStepBlock
from lipnet.layers.parametrization import EvalTensorCache
from lipnet.layers.types import Device

__all__ = ["AmortisedSymbolBound", "CPLConv2d", "CPLLinear"]


def _detached_scale(weight: Tensor) -> Tensor:
    # ||W||^2 = s^2 ||W / s||^2 exactly; with s = max |W| detached the Gram iteration runs on
    # entries of order 1 (no underflow as W -> 0), and the gradient is unchanged because the norm
    # is 1-homogeneous in W.
    return weight.detach().abs().amax().clamp_min(torch.finfo(weight.dtype).tiny)


def _check_common(features: int, inner: int, eps: float, norm_steps: int) -> None:
    if features < 1 or inner < 1:
        raise ValueError(f"feature counts must be >= 1, got features={features}, inner={inner}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if norm_steps < 0:
        raise ValueError(f"norm_steps must be >= 0, got {norm_steps}")


def _init_parameters(weight: Tensor, bias: Tensor) -> None:
    nn.init.xavier_normal_(weight)
    fan_in = weight[0].numel()
    nn.init.uniform_(bias, -(fan_in**-0.5), fan_in**-0.5)


def _bound_from(a: float, norm_sq: Tensor) -> float:
    h2 = float(norm_sq.detach().to(device="cpu", dtype=torch.float64))
    if not (math.isfinite(a) and math.isfinite(h2) and h2 > 0):
        raise ValueError("CPL step norm or weight norm is not a finite positive number: no Lipschitz bound")
    return max(1.0, 2.0 * a * a / h2 - 1.0)


def _round_up(value: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` (float64) cast to ``dtype``, moved up by one ulp where the cast rounded it down."""
    cast = value.to(dtype)
    return torch.where(cast.to(value.dtype) < value, torch.nextafter(cast, cast.new_tensor(math.inf)), cast)


#: Grid frequencies whose ``lambda_max`` is computed by ``eigvalsh`` before the others are certified.
_EXACT_FREQUENCIES = 4
#: Power-iteration steps that rank the frequencies (they set the cost, never the value).
_RANKING_STEPS = 4
#: ``t = (1 + margin) lambda_b``: near-ties (a frequency and its conjugate on the grid's border
#: columns) certify instead of falling back to ``eigvalsh``; the bound moves by at most this much.
_CERTIFY_MARGIN = 1e-6
#: Complex entries of the Gram symbols held at once: chunks keep wide layers within a few hundred MB.
_CHUNK_ENTRIES = 2**22


def _autocorrelation(blocks: Tensor) -> Tensor:
    """Autocorrelation ``A_s`` of kernels ``(G, m, n, k_h, k_w)``: ``(G, 2 k_h - 1, 2 k_w - 1, n, n)``.

    ``A_s[i, j] = sum_o sum_(t - t' = s) W[o, i, t] W[o, j, t']``, gathered from the Gram matrix
    ``R^T R`` of the reshaped kernel ``R`` (``m x n k_h k_w``) by one ``index_add``; offset ``s`` is
    stored at index ``s + k - 1`` per axis.
    """
    g, m, n, kh, kw = blocks.shape
    rows = blocks.reshape(g, m, n * kh * kw)
    pairs = (rows.mT @ rows).reshape(g, n, kh, kw, n, kh, kw).permute(0, 2, 3, 5, 6, 1, 4)
    a, b, a2, b2 = torch.meshgrid(
        *(torch.arange(k, device=blocks.device) for k in (kh, kw, kh, kw)), indexing="ij"
    )
    offset = ((a - a2 + kh - 1) * (2 * kw - 1) + (b - b2 + kw - 1)).reshape(-1)
    out = blocks.new_zeros(g, (2 * kh - 1) * (2 * kw - 1), n, n)
    out.index_add_(1, offset, pairs.reshape(g, -1, n, n))
    return out.reshape(g, 2 * kh - 1, 2 * kw - 1, n, n)


def _gram_symbols(autocorrelation: Tensor, freqs: Tensor) -> Tensor:
    """``H_g(w) = sum_s A_s exp(i <s, w>)`` at frequencies ``(F, 2)``: ``(G, F, n, n)`` complex."""
    g, s1, s2, n, _ = autocorrelation.shape
    o1 = torch.arange(s1, dtype=freqs.dtype, device=freqs.device) - (s1 - 1) // 2
    o2 = torch.arange(s2, dtype=freqs.dtype, device=freqs.device) - (s2 - 1) // 2
    angle = (freqs[:, 0, None, None] * o1[:, None] + freqs[:, 1, None, None] * o2[None, :]).reshape(
        freqs.shape[0], -1
    )
    flat = autocorrelation.reshape(g, s1 * s2, n * n).to(torch.complex128)
    return (torch.polar(torch.ones_like(angle), angle) @ flat).reshape(g, -1, n, n)


def _rank_by_power_iteration(gram: Tensor) -> Tensor:
    """Rayleigh quotients after ``_RANKING_STEPS`` power steps from the all-ones vector: estimates only."""
    x = torch.ones(*gram.shape[:-1], 1, dtype=gram.dtype, device=gram.device)
    for _ in range(_RANKING_STEPS):
        x = gram @ x
        x = x / torch.linalg.vector_norm(x, dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (x.mH @ gram @ x).real.reshape(-1)


class AmortisedSymbolBound(nn.Module):
    """Sound bound ``h >= sup_w sigma_max(K(w))`` of a (grouped) kernel, refreshed only when it is loose.

    For a kernel ``(c_out, c_in / groups, k_h, k_w)`` the bounded quantity is the norm of the
    stride-1 convolution on the infinite grid (the max over groups, the operator being block
    diagonal), which bounds the zero-padded and the circular convolution at every input size.
    ``forward(weight)`` returns, in ``weight``'s dtype, ``h = h0 + delta`` with ``h0`` the grid
    bound at the anchor ``W0`` and ``delta`` the reshaped-kernel bound of ``W - W0`` (proofs in
    :mod:`lipnet.layers.cpl`); it is an upper bound for every ``weight``, whatever the anchor. When
    ``h0 + delta > (1 + drift_tol) <W, tangent>`` (or no anchor exists yet, or ``h0`` is not finite)
    the anchor is first moved to ``weight`` and ``h0`` recomputed. ``<W, tangent>`` is
    ``sqrt(grid_factor) Re(u^H K_W(c*) v)``, a lower bound of the grid bound of the current weight,
    so after every call ``h <= (1 + drift_tol)`` times the grid bound of the current weight. The
    rule is a pure function of the weight and the buffers ``anchor``, ``anchor_bound`` and
    ``tangent``, so a ``state_dict`` round trip or a checkpoint resume reproduces the outputs exactly.

    The bound is computed without autograd, in float64: ``h0`` carries the Cholesky allowance and
    ``1 + FLOAT64_SLACK`` (module docstring), and ``h`` is rounded up when cast to the weight's
    dtype. Cost: the drift bound at every call (one ``c x c k_h k_w`` Gram matrix and the Gram
    iteration); at refreshes only, the grid bound (one ``c k_h k_w``-sized Gram matrix, then per
    frequency a few ``n x n`` products and a Cholesky factorisation, ``eigvalsh`` at a few). On a GPU
    the refresh test is one host sync.

    Gradient: ``dh / dW`` is the stored ``tangent``, the gradient at ``W0`` of the grid bound
    ``sqrt(grid_factor) sigma_max(K_W(c*))`` (``c*`` the grid frequency with the largest computed
    ``lambda_max``, ``u, v`` its top singular vectors: ``sqrt(grid_factor) Re(conj(u_o) v_i
    exp(-i <t, c*>))``), a first-order model of how the norm moves; ``delta`` (a bound on the drift,
    not a function of the norm) carries none. Only the value matters for the guarantee, and the value
    is exactly ``h0 + delta``.
    """

    anchor: Tensor
    anchor_bound: Tensor
    tangent: Tensor

    def __init__(
        self,
        weight_shape: tuple[int, int, int, int],
        *,
        groups: int,
        grid: int,
        drift_tol: float,
        drift_steps: int,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        c_out, _, kh, kw = weight_shape
        if groups < 1 or c_out % groups:
            raise ValueError(f"groups={groups} must divide the {c_out} output channels")
        if not (drift_tol > 0 and math.isfinite(drift_tol)):
            raise ValueError(f"drift_tol must be a finite number > 0, got {drift_tol}")
        if drift_steps < 0:
            raise ValueError(f"drift_steps must be >= 0, got {drift_steps}")
        # a 1 x 1 kernel has a constant symbol: one frequency is exact
        self.grid = 1 if (kh, kw) == (1, 1) else grid
        sigma = math.pi * ((kh - 1) + (kw - 1)) / self.grid
        if sigma >= 2.0 or self.grid < max(kh, kw):
            raise ValueError(
                f"grid={grid} is too coarse for a {kh}x{kw} kernel: need grid > pi (k_h + k_w - 2) / 2"
            )
        self.grid_factor = 1.0 / (1.0 - sigma * sigma / 4.0)
        self.groups = groups
        self.drift_tol = drift_tol
        self.drift_steps = drift_steps
        self.register_buffer("anchor", torch.zeros(weight_shape, device=device, dtype=dtype))
        self.register_buffer("anchor_bound", torch.full((), math.nan, device=device, dtype=dtype))
        self.register_buffer("tangent", torch.zeros(weight_shape, device=device, dtype=dtype))

    def drift_bound(self, weight: Tensor) -> Tensor:
        """Float64 bound ``sqrt(k_h k_w) max_g ||(W - W0)_g reshaped||_2`` of the drift's operator norm."""
        d = weight.detach().to(torch.float64) - self.anchor.to(torch.float64)
        c_out, _, kh, kw = d.shape
        # ||D|| = s ||D / s||: the Gram iteration runs on entries of order 1 (no underflow)
        s = d.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
        rows = (d / s).reshape(self.groups, c_out // self.groups, -1)
        gram = rows @ rows.mT if rows.shape[-2] <= rows.shape[-1] else rows.mT @ rows
        return s * torch.sqrt(kh * kw * gram_norm_bound(gram, self.drift_steps).max())

    def _grid_maximum(self, blocks: Tensor) -> tuple[Tensor, int, Tensor]:
        """Bound of ``max_(g, c) lambda_max(H_g(c))`` on the half DFT grid, kernels ``(G, m, c, k_h, k_w)``.

        Returns the float64 bound (rounding allowance included), and the group and frequency of the largest
        ``lambda_max`` computed by ``eigvalsh`` (module docstring: rank, compute the top few,
        certify the rest by Cholesky, compute where a factorisation breaks down).
        """
        n_freq = self.grid
        if blocks.shape[1] < blocks.shape[2]:
            # K K^H has the eigenvalues of K^H K (up to zeros) and is the Gram symbol of the
            # transposed kernel: the smaller matrices
            blocks = blocks.transpose(1, 2)
        autocorrelation = _autocorrelation(blocks)
        groups, n = blocks.shape[0], blocks.shape[2]
        ks = torch.cartesian_prod(
            torch.arange(n_freq, dtype=torch.float64, device=blocks.device),
            torch.arange(n_freq // 2 + 1, dtype=torch.float64, device=blocks.device),
        ).reshape(-1, 2)
        freqs = 2.0 * math.pi / n_freq * ks
        best = torch.zeros((), dtype=torch.float64, device=blocks.device)
        certified = torch.zeros((), dtype=torch.float64, device=blocks.device)
        best_at = (0, freqs[0])
        chunk = max(1, _CHUNK_ENTRIES // (groups * n * n))
        for start in range(0, freqs.shape[0], chunk):
            part = freqs[start : start + chunk]
            gram = _gram_symbols(autocorrelation, part).flatten(0, 1)  # (group, frequency) flattened
            order = _rank_by_power_iteration(gram).argsort(descending=True)
            exact_idx = order[:_EXACT_FREQUENCIES]
            exact = torch.linalg.eigvalsh(gram[exact_idx])[..., -1]
            if order.numel() > _EXACT_FREQUENCIES:
                t = torch.maximum(best, exact.max()) * (1.0 + _CERTIFY_MARGIN)
                shifted = gram.neg_()  # t I - H(c) in place; H(c) = t I - shifted where still needed
                shifted.diagonal(dim1=-2, dim2=-1).add_(t)
                broken = torch.linalg.cholesky_ex(shifted).info != 0
                broken[exact_idx] = False
                failed = broken.nonzero().reshape(-1)
                if failed.numel() < order.numel() - _EXACT_FREQUENCIES:
                    certified = torch.maximum(certified, t)
                # H(c) back: the diagonal's round trip moves lambda_max by at most 2 eps t (allowance)
                again = shifted[failed].neg_()
                again.diagonal(dim1=-2, dim2=-1).add_(t)
                exact_idx = torch.cat([exact_idx, failed])
                exact = torch.cat([exact, torch.linalg.eigvalsh(again)[..., -1]])
            top = int(exact.argmax())
            if start == 0 or exact[top] > best:
                best = exact[top]
                group, cell = divmod(int(exact_idx[top]), part.shape[0])
                best_at = (group, part[cell])
        m, taps = blocks.shape[1], blocks.shape[3] * blocks.shape[4]
        rounding = 4 * (n + 1) ** 2 + (m + 8 * taps + 4) * taps * n
        allowance = 1.0 + rounding * torch.finfo(torch.float64).eps
        return torch.maximum(best, certified).clamp_min(0.0) * allowance, best_at[0], best_at[1]

    @torch.no_grad()
    def refresh(self, weight: Tensor) -> None:
        """Move the anchor to ``weight``: ``h0`` from the grid bound in float64, and its gradient.

        The grid is the ``N x N`` DFT grid (``N = grid``) on half the torus (``k2 <= N / 2``; the
        other half is conjugate); ``h0 = sqrt(grid_factor lambda_grid)`` with ``lambda_grid`` the
        certified bound of ``max_(g, c) lambda_max(H_g(c))``.
        """
        w = weight.detach().to(torch.float64)
        c_out, c_in, kh, kw = w.shape
        blocks = w.reshape(self.groups, c_out // self.groups, c_in, kh, kw)
        # lambda scales as s^2: the eigen-solves run on entries of order 1 (no underflow)
        scale = w.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
        top, group, freq = self._grid_maximum(blocks / scale)
        h0 = scale * torch.sqrt(top * self.grid_factor) * (1.0 + FLOAT64_SLACK)
        # gradient of sqrt(grid_factor) sigma_max(K(c)) at the anchor: Re(conj(u_o) v_i exp(-i <t, c>))
        t1 = torch.arange(kh, dtype=torch.float64, device=w.device)
        t2 = torch.arange(kw, dtype=torch.float64, device=w.device)
        angle = -(freq[0] * t1[:, None] + freq[1] * t2[None, :])
        phase = torch.polar(torch.ones_like(angle), angle)
        symbol = torch.einsum("mcab,ab->mc", blocks[group].to(torch.complex128), phase)
        u, _, vh = torch.linalg.svd(symbol)
        outer = u[:, 0].conj()[:, None] * vh[0].conj()[None, :]
        tangent = torch.zeros_like(blocks)
        tangent[group] = math.sqrt(self.grid_factor) * (outer[:, :, None, None] * phase).real
        self.anchor.copy_(weight.detach())
        self.anchor_bound.copy_(_round_up(h0, self.anchor_bound.dtype))
        self.tangent.copy_(tangent.reshape(w.shape))

    def forward(self, weight: Tensor) -> Tensor:
        with torch.no_grad():
            value = self.anchor_bound.to(torch.float64) + self.drift_bound(weight)
            # <W, tangent> = sqrt(grid_factor) Re(u^H K_W(c*) v) <= the grid bound of W
            floor = (weight.detach().to(torch.float64) * self.tangent.to(torch.float64)).sum()
            if not bool(torch.isfinite(value) & (value <= (1.0 + self.drift_tol) * floor)):
                self.refresh(weight)
                value = self.anchor_bound.to(torch.float64)  # the drift from the new anchor is 0
            value = _round_up(value, weight.dtype)
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return value
        # the clone keeps the saved tensor valid if a later forward refreshes the buffer in place
        linear = (weight * self.tangent.clone()).sum()
        return value + (linear - linear.detach())

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, grid={self.grid}, drift_tol={self.drift_tol:g}, "
            f"drift_steps={self.drift_steps}"
        )


class _CPLBlock(GradientStepBlock):
    """A CPL block: the step ``2 / h^2`` of every inner unit, ``h^2`` cached in eval mode like the
    rescaled weight ``(2 / h^2) W`` (:meth:`~lipnet.layers.gradient_step.GradientStepBlock.step_weight`).

    The forward pass and the export are those of :class:`~lipnet.layers.gradient_step.GradientStepBlock`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache = EvalTensorCache()

    @abstractmethod
    def norm_sq(self) -> Tensor:
        """``h^2``, a sound bound of the squared norm of the inner linear map, in the weight's dtype."""

    def step_sizes(self) -> Tensor:
        """``2 / h^2`` for each inner unit (first dim of ``weight``): the factor in front of ``relu``."""
        return (2.0 / self.norm_sq()).expand(self.weight.shape[0])


class CPLLinear(_CPLBlock):
    """Dense convex potential layer ``y = x - (2 / h^2) W relu(W^T x + b)`` (Meunier et al., ICML 2022).

    ``weight`` is ``W^T``, of shape ``(inner_features, features)`` (``inner_features`` defaults to
    ``features``); ``h^2 = max(eps, gram_norm_bound(Gram(W), norm_steps)) >= ||W||_2^2``. 1-Lipschitz
    for every value of the parameters (proof in :mod:`lipnet.layers.cpl`), not orthogonal.
    """

    def __init__(
        self,
        features: int,
        inner_features: int | None = None,
        *,
        norm_steps: int = 6,
        eps: float = 1e-6,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        inner = features if inner_features is None else inner_features
        _check_common(features, inner, eps, norm_steps)
        self.features = features
        self.inner_features = inner
        self.norm_steps = norm_steps
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(inner, features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(inner, device=device, dtype=dtype))
        _init_parameters(self.weight, self.bias)

    def norm_sq(self) -> Tensor:
        """``h^2``, the sound bound of ``||W||_2^2`` that sets the step, in the weight's dtype."""

        def compute() -> Tensor:
            s = _detached_scale(self.weight)
            v = self.weight / s
            gram = v @ v.mT if v.shape[0] <= v.shape[1] else v.mT @ v
            return (s * s * gram_norm_bound(gram, self.norm_steps)).clamp_min(self.eps)

        return self._cache.get(self.training, (self.weight,), compute)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 bound ``max(1, 2 ||W||_2^2 / h^2 - 1)`` (exact float64 SVD of ``W``)."""
        if input_shape is not None and tuple(input_shape) != (self.features,):
            raise ValueError(f"CPLLinear takes inputs of shape ({self.features},), got {tuple(input_shape)}")
        with torch.no_grad():
            return _bound_from(matrix_spectral_norm(self.weight), self.norm_sq())

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, inner_features={self.inner_features}, "
            f"norm_steps={self.norm_steps}, eps={self.eps:g}"
        )


class CPLConv2d(_CPLBlock):
    """Convolutional convex potential layer ``y = x - (2 / h^2) C^T relu(C x + b)`` (Meunier et al. 2022).

    ``C`` is the stride-1 convolution with kernel ``weight`` of shape ``(inner_channels, channels,
    k, k)`` and zero 'same' padding ``k // 2`` (``k`` odd), ``C^T`` its adjoint
    (``conv_transpose2d``). ``h^2`` is ``h`` squared and floored at ``eps``, with ``h`` the amortised bound
    of :class:`AmortisedSymbolBound` (proofs in :mod:`lipnet.layers.cpl`): ``h >= ||C||_2`` for every
    input size at every step, so the layer is 1-Lipschitz for every value of the parameters and
    every input size, not orthogonal; channels and spatial size are preserved.

    Cost and tightness. Each training step costs the drift bound (a ``c x c`` Gram matrix of the
    ``c x c k^2`` reshaped kernel and ``norm_steps`` squarings, in float64); the grid bound
    (``grid_size^2 / 2`` frequencies: a Cholesky factorisation of a ``c x c`` complex matrix each,
    ``eigvalsh`` at a few) runs only when ``h`` exceeds ``1 + drift_tol`` times a first-order lower
    bound of the grid bound of the current weight. So ``h`` is at most ``1 + drift_tol`` times the
    grid bound of the current weight, itself within the grid correction
    ``(1 - sigma^2 / 4)^(-1/2)``, ``sigma = 2 (k - 1) pi / grid_size``, of the exact every-size norm
    (1.087 at ``grid_size=16`` for ``k = 3``, 1.02 at 32). In eval mode ``h^2`` and the rescaled
    kernel are cached. The forward pass never needs an exact norm: a looser ``h`` is a proportionally
    smaller step, never an unsound one.
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        kernel_size: int = 3,
        *,
        grid_size: int = 16,
        norm_steps: int = 6,
        drift_tol: float = 0.05,
        eps: float = 1e-6,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        inner = channels if inner_channels is None else inner_channels
        _check_common(channels, inner, eps, norm_steps)
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be an odd int >= 1 (same padding), got {kernel_size!r}")
        sigma = 2.0 * (kernel_size - 1) * math.pi / grid_size if grid_size >= 1 else math.inf
        if grid_size < kernel_size or sigma >= 2.0:
            raise ValueError(
                f"grid_size must be >= kernel_size and > (kernel_size - 1) * pi (the grid correction needs "
                f"sigma < 2), got grid_size={grid_size} for kernel_size={kernel_size}"
            )
        self.channels = channels
        self.inner_channels = inner
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2
        self.grid_size = grid_size
        self.norm_steps = norm_steps
        self.eps = eps
        self.weight = nn.Parameter(
            torch.empty(inner, channels, kernel_size, kernel_size, device=device, dtype=dtype)
        )
        self.bias = nn.Parameter(torch.empty(inner, device=device, dtype=dtype))
        _init_parameters(self.weight, self.bias)
        self.norm_bound = AmortisedSymbolBound(
            (inner, channels, kernel_size, kernel_size),
            groups=1,
            grid=grid_size,
            drift_tol=drift_tol,
            drift_steps=norm_steps,
            device=device,
            dtype=dtype,
        )

    def norm_sq(self) -> Tensor:
        """``h^2``, the sound bound of ``||C||_2^2`` (every input size) that sets the step."""

        def compute() -> Tensor:
            return self.norm_bound(self.weight).square().clamp_min(self.eps)

        return self._cache.get(self.training, (self.weight,), compute)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 bound ``max(1, 2 a^2 / h^2 - 1)``, ``a`` = ``conv_operator_bound`` of ``C``.

        Without ``input_shape`` it holds for every input size, with one (``(C, H, W)``) for that size.
        """
        if input_shape is not None and (len(input_shape) != 3 or input_shape[0] != self.channels):
            raise ValueError(
                f"CPLConv2d takes per-sample inputs (C, H, W) with C={self.channels}, "
                f"got {tuple(input_shape)}"
            )
        with torch.no_grad():
            a = conv_operator_bound(
                self.weight,
                stride=1,
                padding=self.padding,
                dilation=1,
                groups=1,
                padding_mode="zeros",
                input_shape=input_shape,
            )
            return _bound_from(a, self.norm_sq())

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner_channels={self.inner_channels}, "
            f"kernel_size={self.kernel_size}, grid_size={self.grid_size}, norm_steps={self.norm_steps}, "
            f"drift_tol={self.norm_bound.drift_tol:g}, eps={self.eps:g}"
        )
