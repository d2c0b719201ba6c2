"""SDP-based Lipschitz Layer (SLL) residual blocks, dense and convolutional.

Araujo, Havens, Delattre, Allauzen & Hu, "A Unified Algebraic Perspective on Lipschitz Neural
Networks", ICLR 2023, Theorem 3. For ``W`` of shape ``(n, m)`` (``n`` features, ``m`` inner units),
a bias ``b`` and a diagonal ``T = diag(t) > 0``, the block

    y = x - 2 W T^(-1) relu(W^T x + b)

is 1-Lipschitz whenever ``T >= W^T W`` in the Loewner order. Proof: ``relu(u) - relu(v) = S (u - v)``
with ``S`` diagonal in ``[0, 1]``, so ``y - y' = (I - 2 A^T S A)(x - x')`` with ``A = T^(-1/2) W^T``;
``T >= W^T W`` means ``||A||_2 <= 1``, so ``A^T S A`` has eigenvalues in ``[0, 1]`` and
``I - 2 A^T S A`` in ``[-1, 1]``. The block is 1-Lipschitz, not orthogonal (not norm-preserving).

Scales (the paper's construction). With ``G = W^T W`` and ``q = exp(log_q) > 0``,
``t_i = sum_j |G_ij| q_j / q_i``. Then ``T >= G``: for every ``x``, by ``|x_i x_j| <= (r x_i^2 +
x_j^2 / r) / 2`` with ``r = r_ij = q_j / q_i`` (so ``r_ij r_ji = 1``),
``x^T G x <= sum_ij |G_ij| |x_i x_j| <= sum_i x_i^2 sum_j |G_ij| r_ij = x^T T x``. Only
``r_ij r_ji >= 1`` is used, so the log-ratios ``log_q_j - log_q_i`` may be clipped to ``[-30, 30]``
(clipping keeps them antisymmetric); this keeps ``r`` finite in float32 however far training moves
``log_q``.

Guard against division by zero (the published code needed an erratum here): ``t_i`` vanishes when
column ``i`` of ``W`` does (``t_i >= G_ii = ||w_i||^2``), so the blocks divide by ``t_i + eps``
with ``eps > 0``. This stays 1-Lipschitz: ``T + eps I >= T >= G``, i.e. a smaller step on each
inner unit; a zero column gives a zero update instead of ``0 / 0``.

Convolution. ``W^T`` becomes the zero-padded "same" convolution ``C`` (``m`` output channels, odd
kernel, stride 1) and ``W`` its adjoint ``conv_transpose2d`` with the same padding. ``C C^T`` is
dominated (Loewner) by the restriction of the infinite-grid operator ``T_inf T_inf^T`` (zero padding
is an embedding ``E`` with ``E E^T <= I``), whose entry for inner channels ``i, j`` at spatial shift
``s`` is the kernel cross-correlation ``B_ij(s) = sum_c sum_u K[i, c, u] K[j, c, u + s]``. Rows of
a restriction have fewer terms, so ``t_i = sum_j sum_s |B_ij(s)| q_j / q_i`` (one scale per inner
channel) satisfies ``T >= C C^T`` for every input size, by the same inequality.

``lipschitz_bound()`` does not assume the theorem's hypothesis: it reads the scales the forward
pass uses (``1 / (t + eps)`` in the layer's dtype), recomputes ``G`` in float64 and bounds
``||A||_2^2 <= rho = max_i (sum_j |G_ij| r_ij) / (t_i + eps)`` (generalised Schur test with the same
AM-GM inequality applied to ``T^(-1/2) G T^(-1/2)``), adding the float64 rounding of ``G``
explicitly (``|fl(G_ij) - G_ij| <= gamma_N (|W|^T |W|)_ij``, Higham, "Accuracy and Stability of
Numerical Algorithms", 2002, §3.1). The bound is ``max(1, 2 rho - 1)``: exactly 1 when the scales
are correct, ``1 + O(1e-6)`` when float32 rounding left them slightly small.

Proofs: ``docs/proofs/residual-blocks.md#lemma-sll`` and ``#lemma-sll-check``.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.contract import FLOAT64_SLACK
from lipnet.layers.gradient_step import GradientStepBlock
from lipnet.layers.parametrization import EvalTensorCache
from lipnet.layers.types import Device

__all__ = ["SLLConv2d", "SLLLinear"]


#: Clip of the log-ratios ``log_q_j - log_q_i``: ``exp(30) ~ 1e13`` keeps sums of float32 Gram
#: entries finite, and clipping an antisymmetric matrix keeps it antisymmetric (see module doc).
_LOG_RATIO_CLIP = 30.0
#: Unit roundoff of float64.
_UNIT_ROUNDOFF = 2.0**-53


def _ratio_weights(log_q: Tensor) -> Tensor:
    """``r_ij = q_j / q_i`` with the log-ratio clipped to ``[-30, 30]`` (``r_ij r_ji = 1``)."""
    return (log_q[None, :] - log_q[:, None]).clamp(-_LOG_RATIO_CLIP, _LOG_RATIO_CLIP).exp()


def _kernel_correlation(kernel: Tensor) -> Tensor:
    """``B[i, j, s] = sum_c sum_u K[i, c, u + s] K[j, c, u]`` (shape ``(m, m, 2k_h-1, 2k_w-1)``)."""
    kh, kw = kernel.shape[-2:]
    return F.conv2d(kernel, kernel, padding=(kh - 1, kw - 1))


class _SLLBlock(GradientStepBlock):
    """Shared parameters and scales of the SLL blocks; subclasses give the Gram operator.

    The forward pass (``x - W^T diag(s) relu(W x + b)`` with ``s = 2 / (t + eps)``) and the export are
    those of :class:`~lipnet.layers.gradient_step.GradientStepBlock`.
    """

    #: Dimensions of one input sample: 1 for dense blocks, 3 (C, H, W) for convolutions.
    input_ndim: int
    weight: Tensor
    bias: Tensor
    log_q: Tensor

    def __init__(self, features: int, inner: int, eps: float) -> None:
        super().__init__()
        if features < 1 or inner < 1:
            raise ValueError(f"feature counts must be >= 1, got features={features}, inner={inner}")
        if not (eps > 0 and eps < float("inf")):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        self.eps = eps
        self._cache = EvalTensorCache()

    def _init_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)
        fan_in = self.weight[0].numel()
        nn.init.uniform_(self.bias, -(fan_in**-0.5), fan_in**-0.5)
        nn.init.zeros_(self.log_q)

    @abstractmethod
    def _gram_terms(self, weight: Tensor) -> Tensor:
        """The Gram entries of ``weight`` whose absolute values are summed into ``t``: ``(m, m, ...)``."""

    @abstractmethod
    def _gram_length(self) -> int:
        """Number of products summed in one Gram entry plus entries summed in one row (for rounding)."""

    def _abs_row_sums(self, weight: Tensor, log_q: Tensor) -> Tensor:
        gram = self._gram_terms(weight).abs()
        per_pair = gram.flatten(2).sum(-1) if gram.ndim > 2 else gram
        return (per_pair * _ratio_weights(log_q)).sum(-1)

    def inverse_scales(self) -> Tensor:
        """``1 / (t + eps)``, the per-inner-unit step of the block, in the weight's dtype."""

        def compute() -> Tensor:
            return (self._abs_row_sums(self.weight, self.log_q) + self.eps).reciprocal()

        return self._cache.get(self.training, (self.weight, self.log_q), compute)

    def step_sizes(self) -> Tensor:
        """``2 / (t + eps)`` per inner unit (first dim of ``weight``): the factor in front of ``relu``."""
        return 2.0 * self.inverse_scales()

    def _step_sources(self) -> tuple[Tensor, ...]:
        return (self.weight, self.log_q)

    def _check_shape(self, input_shape: tuple[int, ...] | None, ndim: int) -> None:
        features = self.weight.shape[1]
        if input_shape is not None and (len(input_shape) != ndim or input_shape[0] != features):
            raise ValueError(
                f"{type(self).__name__} takes per-sample inputs with {ndim} dims and {features} "
                f"features/channels first, got input_shape={tuple(input_shape)}"
            )

    def _rho(self) -> float:
        """Sound float64 bound ``rho >= ||T^(-1/2) W^T||_2^2`` for the scales in use (module doc)."""
        with torch.no_grad():
            inv_t = self.inverse_scales().detach().to(device="cpu", dtype=torch.float64)
            w = self.weight.detach().to(device="cpu", dtype=torch.float64)
            log_q = self.log_q.detach().to(device="cpu", dtype=torch.float64)
            if not (torch.isfinite(w).all() and torch.isfinite(inv_t).all() and torch.isfinite(log_q).all()):
                raise ValueError(
                    f"{type(self).__name__} has NaN or Inf weights or scales: no Lipschitz bound exists"
                )
            if bool((inv_t < 0).any()):
                raise ValueError(f"{type(self).__name__} has negative scales: no Lipschitz bound exists")
            gamma = 2.0 * self._gram_length() * _UNIT_ROUNDOFF
            # |fl(G)| + gamma |W|^T|W| bounds |G| entrywise; (1 + gamma)^2 covers the row sums, the
            # exponentials of r (r_ij r_ji >= 1 - 2u) and the final products.
            signed = self._abs_row_sums(w, log_q)
            absolute = self._abs_row_sums(w.abs(), log_q)
            rows = signed + gamma * absolute
            return float((rows * inv_t).max()) * (1.0 + gamma) ** 2 * (1.0 + FLOAT64_SLACK)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 bound ``max(1, 2 rho - 1)`` of the block's Lipschitz constant (module doc).

        Holds for every input size; ``input_shape`` (per sample) is only checked.
        """
        self._check_shape(input_shape, self.input_ndim)
        return max(1.0, 2.0 * self._rho() - 1.0)


class SLLLinear(_SLLBlock):
    """Dense SLL residual block ``y = x - 2 W T^(-1) relu(W^T x + b)`` (Araujo et al., ICLR 2023).

    ``weight`` is ``W^T``, of shape ``(inner_features, features)`` (``inner_features`` defaults to
    ``features``); ``t_i = sum_j |W^T W|_ij q_j / q_i + eps``, ``q = exp(log_q)``. 1-Lipschitz for
    every value of the parameters (proof in :mod:`lipnet.layers.sll`), not orthogonal; the input
    and output have ``features`` entries.
    """

    input_ndim = 1

    def __init__(
        self,
        features: int,
        inner_features: int | None = None,
        *,
        eps: float = 1e-6,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        inner = features if inner_features is None else inner_features
        super().__init__(features, inner, eps)
        self.features = features
        self.inner_features = inner
        self.weight = nn.Parameter(torch.empty(inner, features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(inner, device=device, dtype=dtype))
        self.log_q = nn.Parameter(torch.empty(inner, device=device, dtype=dtype))
        self._init_parameters()

    def _gram_terms(self, weight: Tensor) -> Tensor:
        return weight @ weight.mT

    def _gram_length(self) -> int:
        return self.features + self.inner_features

    def extra_repr(self) -> str:
        return f"features={self.features}, inner_features={self.inner_features}, eps={self.eps:g}"


class SLLConv2d(_SLLBlock):
    """Convolutional SLL residual block ``y = x - 2 C^T T^(-1) relu(C x + b)`` (Araujo et al., ICLR 2023).

    ``C`` is the stride-1 convolution with kernel ``weight`` of shape ``(inner_channels, channels,
    k, k)`` and zero 'same' padding ``k // 2`` (``k`` odd), ``C^T`` its adjoint
    (``conv_transpose2d`` with the same padding); ``t_i = sum_j sum_s |B_ij(s)| q_j / q_i + eps``
    with ``B`` the kernel cross-correlation. 1-Lipschitz for every value of the parameters and
    every input size (proof in :mod:`lipnet.layers.sll`), not orthogonal; channels and spatial
    size are preserved.
    """

    input_ndim = 3

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        kernel_size: int = 3,
        *,
        eps: float = 1e-6,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        inner = channels if inner_channels is None else inner_channels
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be an odd int >= 1 (same padding), got {kernel_size!r}")
        super().__init__(channels, inner, eps)
        self.channels = channels
        self.inner_channels = inner
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(
            torch.empty(inner, channels, kernel_size, kernel_size, device=device, dtype=dtype)
        )
        self.bias = nn.Parameter(torch.empty(inner, device=device, dtype=dtype))
        self.log_q = nn.Parameter(torch.empty(inner, device=device, dtype=dtype))
        self._init_parameters()

    def _gram_terms(self, weight: Tensor) -> Tensor:
        return _kernel_correlation(weight)

    def _gram_length(self) -> int:
        return self.channels * self.kernel_size**2 + self.inner_channels * (2 * self.kernel_size - 1) ** 2

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inner_channels={self.inner_channels}, "
            f"kernel_size={self.kernel_size}, eps={self.eps:g}"
        )
