"""Lipschitz-bounded token mixing: dot-product, L2 (Kim et al.) and memory attention.

Plain dot-product self-attention ``softmax(Q K^T / sqrt(d_k)) V`` is not Lipschitz on R^{N x d}
(Kim, Papamakarios & Mnih, ICML 2021, Theorem 3.1). The three modules here are. Inputs are token
sequences ``(batch, N, dim)``; the Lipschitz constants are for the Frobenius norm of a sample.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lipnet.attention._bounds import (
    SLACK,
    NormalizedModule,
    ball_projection,
    check_int,
    check_positive,
    lambert_w0_upper,
    spectral_norm,
)

__all__ = ["BoundedDotProductAttention", "L2MultiheadAttention", "MemoryAttention"]


def _check_tokens(x: Tensor, dim: int, who: str) -> None:
    if x.ndim != 3 or x.shape[2] != dim:
        raise ValueError(f"{who} expects tokens of shape (batch, N, {dim}), got {tuple(x.shape)}")


class BoundedDotProductAttention(NormalizedModule):
    """Multi-head dot-product self-attention on tokens projected onto the ball of radius ``r``.

    ``X <- Pi_r(X)`` (each token projected onto ``||x_i|| <= r``: non-expansive); head ``h``:
    ``P^h = row-softmax(X A_h X^T)`` with ``A_h = W_Q^h^T W_K^h / sqrt(d_k)`` (no query/key bias),
    ``Y^h = P^h (X W_V^h^T + b_V^h)``; output ``[Y^1 .. Y^H] W_O^T + b_O``.

    Bound (proof: ``docs/proofs/attention.md#lemma-bounded-dot-product``): with
    ``sigma_h = r^2 ||A_h||`` every score is in ``[-sigma_h, sigma_h]``, so ``P_ij <= e^{2 sigma_h} / N``
    and ``||P||_2 <= sqrt(||P||_1 ||P||_inf) <= min(sqrt N, e^{sigma_h})``. Splitting
    ``dY = P dX W_V^T + dP X' W_V^T``, the second part is bounded row by row by Lemma 2 (values of
    norm ``<= ||W_V^h|| r`` around the centre ``b_V``, softmax factor ``min(1/sqrt 2, e^{sigma_h} / sqrt N)``)
    with ``||dS||_F <= 2 sqrt(N) r ||A_h|| ||dX||``. Hence

        L_h = ||W_V^h|| (min(sqrt N, e^{sigma_h}) + 2 sigma_h min(sqrt(N / 2), e^{sigma_h})),
        L = ||W_O|| sqrt(sum_h L_h^2),

    with exact float64 spectral norms (``||A_h||`` of the product itself). Without a sequence
    length the ``N``-free terms ``e^{sigma_h}`` are used, so the bound holds for every ``N``.
    Guarantee: ``L``-Lipschitz on all of R^{N x dim}; with ``normalize=True`` at most 1-Lipschitz
    (up to the rounding of ``L`` to the module dtype). ``sigma_h`` is the sharpness knob.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        head_dim: int | None = None,
        radius: float = 1.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("heads", heads)
        self.head_dim = check_int("head_dim", head_dim) if head_dim is not None else max(dim // heads, 1)
        self.dim, self.heads = dim, heads
        self.radius = check_positive("radius", radius)
        self.normalize = bool(normalize)
        inner = heads * self.head_dim
        self.query = nn.Linear(dim, inner, bias=False)
        self.key = nn.Linear(dim, inner, bias=False)
        self.value = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def _split(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def attention(self, x: Tensor) -> Tensor:
        """The attention weights ``P``, shape ``(batch, heads, N, N)``."""
        _check_tokens(x, self.dim, type(self).__name__)
        t = ball_projection(x, self.radius, dim=-1)
        q, k = self._split(self.query(t)), self._split(self.key(t))
        return (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens(x, self.dim, type(self).__name__)
        t = ball_projection(x, self.radius, dim=-1)
        q, k, v = self._split(self.query(t)), self._split(self.key(t)), self._split(self.value(t))
        p = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).softmax(dim=-1)
        y = self.out((p @ v).transpose(1, 2).flatten(2))
        return self._normalized(y, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        n = None if input_shape is None else input_shape[0]
        d = self.head_dim
        total = self.out.weight.new_zeros((), dtype=torch.float64)
        for h in range(self.heads):
            rows = slice(h * d, (h + 1) * d)
            wq = self.query.weight[rows].to(torch.float64)
            wk = self.key.weight[rows].to(torch.float64)
            sigma = self.radius**2 * spectral_norm(wq.T @ wk) / math.sqrt(d)
            spread = sigma.exp()
            first = spread if n is None else torch.clamp(spread, max=math.sqrt(n))
            second = spread if n is None else torch.clamp(spread, max=math.sqrt(n / 2))
            head = spectral_norm(self.value.weight[rows]) * (first + 2 * sigma * second)
            total = total + head**2
        return spectral_norm(self.out.weight) * total.sqrt() * SLACK

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, radius={self.radius}"


class L2MultiheadAttention(NormalizedModule):
    """L2 multi-head self-attention of Kim, Papamakarios & Mnih (ICML 2021), tied queries and keys.

    Head ``h`` (``d = dim / heads``): ``P^h_ij = softmax_j(-||W_Q^h x_i - W_Q^h x_j||^2 / sqrt d)``,
    keys tied to queries (``W_K = W_Q``), and the value path of the paper,
    ``f^h = P^h X A_h W_V^h^T`` with ``A_h = W_Q^h^T W_Q^h / sqrt d``; output
    ``[f^1 .. f^H] W_O^T + b_O``. Bound (proof: ``docs/proofs/attention.md#lemma-l2-attention``),
    with ``w = W_0((N - 1) / e)`` (``W_0`` the principal Lambert W function, a float64 upper bound):

        L_h = ||W_V^h W_Q^h^T|| ||W_Q^h|| (sqrt(N) (1 + 2 w) + 2 w) / sqrt(d),
        L = ||W_O|| sqrt(sum_h L_h^2).

    ``f^h_i = (W_V^h W_Q^h^T / sqrt d) sum_j P_ij q_j`` with ``q = W_Q^h x``, and the map
    ``Q -> P Q`` is ``sqrt(N) (1 + 2 w) + 2 w``-Lipschitz. The bound is quadratic in ``W_Q^h``, as the
    Lipschitz constant is (scaling ``W_Q`` by ``t`` scales it by ``t^2``); Kim et al.'s Theorem 3.2,
    ``sqrt(N / d) (4 W_0(N / e) + 1) sqrt(sum_h ||W_Q^h||^2 ||W_V^h||^2) ||W_O||``, is linear in ``W_Q``
    and fails for large query weights. ``||W_V^h W_Q^h^T||`` is the float64 norm of the computed
    product plus its rounding ``gamma_d ||W_V^h||_F ||W_Q^h||_F``, capped by ``||W_V^h|| ||W_Q^h||``.
    ``L`` grows like ``sqrt(N) log N``: a finite bound needs the sequence length, so
    ``lipschitz_bound(None)`` is ``inf`` unless ``normalize=True`` (the forward divides by the bound for
    the actual ``N``). Guarantee: ``L``-Lipschitz on all of R^{N x dim}; with ``normalize=True`` at most
    1-Lipschitz (up to the rounding of ``L``).

    The tying and the value path are what make the map Lipschitz: with an untied value
    projection ``P^h X W_V^T``, token components in the null space of ``W_Q^h`` leave the scores
    unchanged while the values, and with them the Jacobian, grow without bound. ``tied=False`` is
    therefore refused.
    """

    def __init__(self, dim: int, heads: int = 1, tied: bool = True, normalize: bool = True) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("heads", heads)
        if not tied:
            raise ValueError(
                "L2MultiheadAttention with an untied value projection P X W_V is not Lipschitz (values grow "
                "in the null space of W_Q while the scores stay put); only the tied form of Kim et al. is "
                "bounded"
            )
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.normalize = bool(normalize)
        self.query = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens(x, self.dim, type(self).__name__)
        scale = math.sqrt(self.head_dim)
        q = self.query(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, N, d)
        # Differences rather than cdist: exact squared distances, and forward-mode AD is supported.
        p = (-(q.unsqueeze(-2) - q.unsqueeze(-3)).square().sum(-1) / scale).softmax(dim=-1)
        wq = self.query.weight.unflatten(0, (self.heads, self.head_dim))  # (H, d, dim)
        xa = q @ wq / scale  # rows x_i^T A_h: (B, H, N, dim)
        wv = self.value.weight.unflatten(0, (self.heads, self.head_dim))  # (H, d, dim)
        heads = p @ xa @ wv.transpose(-1, -2)  # (B, H, N, d)
        y = self.out(heads.transpose(1, 2).flatten(2))
        return self._normalized(y, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        if input_shape is None:
            # The bound grows like sqrt(N) log N: no finite constant holds for every sequence length.
            return self.out.weight.new_tensor(math.inf, dtype=torch.float64)
        n = input_shape[0]
        d = self.head_dim
        # Lip(Q -> P Q) for N tokens; (n - 1) / e rounds by half an ulp, which SLACK covers (W_0' <= 1).
        w = lambert_w0_upper((n - 1) / math.e)
        mixing = (math.sqrt(n) * (1.0 + 2.0 * w) + 2.0 * w) * SLACK / math.sqrt(d)
        # Higham's gamma_d = d u / (1 - d u) for the float64 product W_V W_Q^T (inner dimension dim).
        gamma = self.dim * 2.0**-53 / (1.0 - self.dim * 2.0**-53)
        total = self.out.weight.new_zeros((), dtype=torch.float64)
        for h in range(self.heads):
            rows = slice(h * d, (h + 1) * d)
            wq = self.query.weight[rows].to(torch.float64)
            wv = self.value.weight[rows].to(torch.float64)
            query = spectral_norm(wq)
            # ||W_V W_Q^T|| <= ||fl(W_V W_Q^T)|| + ||fl - exact||_F, the error entrywise at most
            # gamma_d (|W_V| |W_Q|^T), whose Frobenius norm is at most ||W_V||_F ||W_Q||_F.
            rounding = gamma * torch.linalg.matrix_norm(wv) * torch.linalg.matrix_norm(wq) * SLACK
            product = torch.minimum(spectral_norm(wv @ wq.T) + rounding, spectral_norm(wv) * query)
            total = total + (product * query) ** 2
        return mixing * total.sqrt() * SLACK * spectral_norm(self.out.weight)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"


class MemoryAttention(nn.Module):
    """Soft attention of every token over ``slots`` learned memory slots, exactly non-expansive.

    ``y = x - t W^T softmax(beta W x + b)`` per token, with ``W`` the ``slots x dim`` memory and
    ``t <= 4 / (beta ||W||^2)``. Proof (``docs/proofs/attention.md#lemma-memory-attention``):
    ``phi(x) = LSE(beta W x + b) / beta`` is convex with gradient ``W^T softmax(beta W x + b)`` and
    Hessian ``beta W^T J W``, ``J <= I / 2`` (the softmax Jacobian's eigenvalues are at most 1/2),
    so the gradient is ``L = beta ||W||^2 / 2``-Lipschitz, hence ``1/L``-cocoercive
    (Baillon-Haddad), and ``||dx - t dg||^2 <= ||dx||^2 + t (t - 2 / L) ||dg||^2 <= ||dx||^2`` for
    ``t <= 2 / L``. The analogue of the convex potential layer of Meunier et al. (ICML 2022) with
    a log-sum-exp potential. The step is computed from the float64 spectral norm and rounded down
    in the module dtype, so :meth:`lipschitz_bound` (the general ``sqrt(1 + t (t - 2/L) L^2)`` when
    ``t > 2/L``, else 1) returns 1.0. Guarantee: 1-Lipschitz on all of R^{N x dim}, no
    normalisation needed.
    """

    def __init__(self, dim: int, slots: int, beta: float = 1.0) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("slots", slots)
        self.dim, self.slots = dim, slots
        self.beta = check_positive("beta", beta)
        self.memory = nn.Parameter(torch.randn(slots, dim) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(slots))

    def _step(self, dtype: torch.dtype) -> Tensor:
        norm = spectral_norm(self.memory)
        step = 4.0 / (self.beta * norm.square())
        # fl(t (1 - 2u)) <= t (1 - 2u)(1 + u) < t: the step used never exceeds the proven one.
        return (step * (1.0 - torch.finfo(dtype).eps)).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens(x, self.dim, type(self).__name__)
        weights = (self.beta * (x @ self.memory.T) + self.bias).softmax(dim=-1)
        return x - self._step(x.dtype) * (weights @ self.memory)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """``sqrt(1 + t (t - 2/L) L^2)`` if the step ``t`` exceeds ``2/L``, else 1 (see the class doc)."""
        with torch.no_grad():
            smooth = self.beta * float(spectral_norm(self.memory)) ** 2 / 2.0
            step = float(self._step(self.memory.dtype))
        if step <= 2.0 / smooth:
            return 1.0
        return math.sqrt(1.0 + step * (step - 2.0 / smooth) * smooth**2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, slots={self.slots}, beta={self.beta}"
