"""The gradient-step block shared by SLL and CPL, and its frozen form :class:`PotentialStep`.

Both the SDP-based Lipschitz layers (Araujo, Havens, Delattre, Allauzen & Hu, ICLR 2023,
:mod:`lipnet.layers.sll`) and the convex potential layers (Meunier, Delattre, Araujo & Allauzen,
ICML 2022, :mod:`lipnet.layers.cpl`) are residual blocks

    y = x - W^T diag(s) relu(W x + b),

an explicit gradient step on the convex potential ``V(x) = sum_i s_i relu(w_i^T x + b_i)^2 / 2``
with a per-unit step ``s >= 0`` that each method chooses so that the block is 1-Lipschitz (proofs
in their modules). ``W`` is a dense weight ``(inner, features)`` or the kernel ``(inner, channels,
k, k)`` of a stride-1 convolution with zero 'same' padding (odd ``k``), ``W^T`` its adjoint
(``conv_transpose2d``). :class:`GradientStepBlock` holds the computation (forward, the eval-cached
rescaled weight ``diag(s) W``, the export); :class:`PotentialStep` is the same computation with
frozen plain layers, what :func:`lipnet.export` makes of a block.

Proofs: ``docs/proofs/residual-blocks.md#lemma-gradient-step`` and ``#lemma-potential-step``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.contract import FLOAT64_SLACK, matrix_spectral_norm
from certify.rules.conv import conv_operator_bound
from lipnet.layers.base import eval_mode, set_frozen_weights
from lipnet.layers.parametrization import EvalTensorCache

__all__ = ["GradientStepBlock", "PotentialStep"]

#: Unit roundoff of float64.
_UNIT_ROUNDOFF = 2.0**-53


class GradientStepBlock(nn.Module, ABC):
    """A block ``y = x - W^T diag(s) relu(W x + b)`` (SLL, CPL): its steps ``s`` and its rescaled weight.

    ``weight`` holds ``W`` (inner units along the first dimension) and ``bias`` ``b``: a dense block
    when ``weight`` has 2 dimensions, otherwise a convolution with ``padding`` ``k // 2`` (zero
    'same' padding, stride 1) whose adjoint is ``conv_transpose2d`` with the same padding. Subclasses
    give :meth:`step_sizes`; :meth:`_step_sources` lists the tensors the steps are computed from (the
    key of the eval cache of :meth:`step_weight`). Guarantee: none here; each subclass's step makes
    its block 1-Lipschitz (not orthogonal) and its ``lipschitz_bound`` checks it from the weights.
    """

    weight: Tensor
    bias: Tensor
    #: Zero 'same' padding of a convolution block (``kernel_size // 2``); dense blocks have none.
    padding: int
    kernel_size: int

    def __init__(self) -> None:
        super().__init__()
        self._step_cache = EvalTensorCache()

    @abstractmethod
    def step_sizes(self) -> Tensor:
        """The step ``s_i >= 0`` of each inner unit (first dim of ``weight``), the factor before ``relu``."""

    def _step_sources(self) -> tuple[Tensor, ...]:
        return (self.weight,)

    def step_weight(self) -> Tensor:
        """``diag(s) W``, the weight of the block's second product (applied by its adjoint), eval-cached.

        Cached by :class:`~lipnet.layers.parametrization.EvalTensorCache` (recomputed in training mode,
        when an autograd graph is needed and when a source tensor changes, e.g. by an optimizer step or
        ``load_state_dict``), so that a warm eval forward is the two products of a frozen block and
        nothing else, which matters when the weight is large next to the batch (a dense block of 2048
        inner units at batch 1 spent half its time rescaling the weight).
        """

        def compute() -> Tensor:
            return self.weight * self.step_sizes().reshape(-1, *(1,) * (self.weight.ndim - 1))

        return self._step_cache.get(self.training, self._step_sources(), compute)

    def forward(self, x: Tensor) -> Tensor:
        # the step s scales the small weight, not the activations
        if self.weight.ndim == 2:
            res = F.relu(F.linear(x, self.weight, self.bias))
            return x - F.linear(res, self.step_weight().mT)
        res = F.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding))
        return x - F.conv_transpose2d(res, self.step_weight(), padding=self.padding)

    def export(self) -> PotentialStep:
        """:class:`PotentialStep` of plain layers holding ``W``, ``b`` and ``diag(s) W`` as used in eval mode.

        A dense block becomes two ``nn.Linear``; a convolution block an ``nn.Conv2d`` holding the kernel
        and bias and an ``nn.ConvTranspose2d`` holding the rescaled kernel (the adjoint of the
        convolution with it). Each holds its tensor in the layout the block passes to its product (the
        transposed ``step_weight().mT`` of a dense block included), so the frozen block repeats this
        block's eval forward operation for operation.
        """
        with eval_mode(self):
            weight, bias = self.weight.detach(), self.bias.detach()
            device, dtype = weight.device, weight.dtype
            inner_units, features = weight.shape[:2]
            inner: nn.Linear | nn.Conv2d
            outer: nn.Linear | nn.ConvTranspose2d
            if weight.ndim == 2:
                dense = nn.Linear(features, inner_units, device=device, dtype=dtype)
                inner = set_frozen_weights(dense, weight, bias)
                step = nn.Linear(inner_units, features, bias=False, device=device, dtype=dtype)
                outer = set_frozen_weights(step, self.step_weight().mT, None)
            else:
                k, p = self.kernel_size, self.padding
                conv = nn.Conv2d(features, inner_units, k, padding=p, device=device, dtype=dtype)
                inner = set_frozen_weights(conv, weight, bias)
                transposed = nn.ConvTranspose2d(
                    inner_units, features, k, padding=p, bias=False, device=device, dtype=dtype
                )
                outer = set_frozen_weights(transposed, self.step_weight(), None)
            return PotentialStep(inner, outer, self.step_sizes())


class PotentialStep(nn.Module):
    """Residual block ``y = x - outer(relu(inner(x)))`` with ``outer`` the rescaled adjoint of ``inner``.

    ``inner`` is ``x -> Q x + b`` (an ``nn.Linear``, or an ``nn.Conv2d`` with odd kernel, stride 1,
    zero 'same' padding), ``outer`` is ``z -> P^T z`` (an ``nn.Linear`` without bias holding
    ``P^T``, or an ``nn.ConvTranspose2d`` without bias and with the same geometry, the exact adjoint
    of the convolution with kernel ``P`` on inputs of the block's size), and ``steps`` ``s >= 0``
    (one per inner unit) with ``P = diag(s) Q + E``, ``E`` the rounding of the product. For
    ``E = 0`` this is the gradient step ``x - grad V(x)`` on the convex potential
    ``V(x) = sum_i s_i relu(q_i^T x + b_i)^2 / 2``: the frozen form of the SLL blocks (Araujo et
    al., ICLR 2023, ``s = 2 / (t + eps)``) and of the convex potential layers (Meunier et al., ICML
    2022, ``s = 2 / h^2``), whose eval forward it reproduces operation for operation.

    Guarantee: Lipschitz with constant at most ``max(1, a^2 - 1) + e q`` for ``a >= ||diag(s)^(1/2)
    Q||``, ``e >= ||E||``, ``q >= ||Q||``. Proof: ``relu(u) - relu(v) = S (u - v)`` with ``S``
    diagonal in ``[0, 1]``, so ``y - y' = (I - P^T S Q)(x - x')`` and ``P^T S Q = M^T S M + E^T S Q``
    with ``M = diag(s)^(1/2) Q`` (diagonal matrices commute); ``M^T S M`` has eigenvalues in
    ``[0, a^2]``, so ``I - M^T S M`` has norm at most ``max(1, a^2 - 1)``, and ``||E^T S Q|| <= e q``.
    For the blocks it comes from, ``a^2 <= 2`` (their theorems), so the block is 1-Lipschitz up to
    ``e q``, of the order of the float32 unit roundoff. Not orthogonal.
    """

    if TYPE_CHECKING:  # the buffer's type, for type checkers only: TorchScript cannot read string annotations
        steps: Tensor

    def __init__(
        self, inner: nn.Linear | nn.Conv2d, outer: nn.Linear | nn.ConvTranspose2d, steps: Tensor
    ) -> None:
        super().__init__()
        m = inner.out_features if isinstance(inner, nn.Linear) else inner.out_channels
        if type(inner) is nn.Linear and type(outer) is nn.Linear:
            if (outer.in_features, outer.out_features) != (m, inner.in_features) or outer.bias is not None:
                raise ValueError(
                    f"outer must be nn.Linear({m}, {inner.in_features}, bias=False) for this inner layer, "
                    f"got {outer}"
                )
        elif type(inner) is nn.Conv2d and type(outer) is nn.ConvTranspose2d:
            same = tuple(k // 2 for k in inner.kernel_size)
            plain = dict(stride=(1, 1), dilation=(1, 1), groups=1, padding_mode="zeros", padding=same)
            if any(k % 2 == 0 for k in inner.kernel_size) or any(
                getattr(inner, key) != value for key, value in plain.items()
            ):
                raise ValueError(
                    f"inner must be an nn.Conv2d with odd kernel, stride 1, no dilation or groups and zero "
                    f"'same' padding, got {inner}"
                )
            if (
                any(getattr(outer, key) != value for key, value in plain.items())
                or outer.output_padding != (0, 0)
                or outer.kernel_size != inner.kernel_size
                or (outer.in_channels, outer.out_channels) != (m, inner.in_channels)
                or outer.bias is not None
            ):
                raise ValueError(
                    "outer must be the nn.ConvTranspose2d of inner's geometry from its output to its input "
                    f"channels, without bias, got {outer}"
                )
        else:
            raise TypeError(
                "PotentialStep takes (nn.Linear, nn.Linear) or (nn.Conv2d, nn.ConvTranspose2d), got "
                f"({type(inner).__name__}, {type(outer).__name__})"
            )
        if tuple(steps.shape) != (m,):
            raise ValueError(f"steps must have shape ({m},), one per inner unit, got {tuple(steps.shape)}")
        self.inner = inner
        self.outer = outer
        self.register_buffer("steps", steps.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x - self.outer(F.relu(self.inner(x)))

    def _operator_bound(self, weight: Tensor, input_shape: tuple[int, ...] | None, *, tight: bool) -> float:
        """Sound float64 bound of the norm of ``inner``'s linear map with ``weight`` in place of its own.

        Without ``input_shape`` and ``tight``, a convolution gets the cheap every-size bound
        ``sqrt(k_h k_w) ||K_r||_2`` (``K_r`` the reshaped ``c_out x c_in k_h k_w`` kernel: the symbol is
        ``K_r`` times a vector of ``k_h k_w`` unit phases) instead of ``conv_operator_bound``'s search.
        """
        if isinstance(self.inner, nn.Linear):
            return matrix_spectral_norm(weight)
        if input_shape is None and not tight:
            return math.sqrt(math.prod(self.inner.kernel_size)) * matrix_spectral_norm(weight)
        return conv_operator_bound(
            weight,
            stride=1,
            padding=self.inner.padding,
            dilation=1,
            groups=1,
            padding_mode="zeros",
            input_shape=input_shape,
        )

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 bound ``max(1, a^2 - 1) + e q`` of the class docstring, from the weights held.

        ``a``, ``e`` and ``q`` are operator-norm bounds (``conv_operator_bound`` for that input size;
        without ``input_shape``, for every size: ``conv_operator_bound`` for ``a``, the reshaped-kernel
        bound for the rounding term ``e q``; float64 SVD for dense blocks) of ``diag(s)^(1/2) Q``,
        ``E = P - diag(s) Q`` and ``Q``, computed in float64. Each entry of ``diag(s) Q``, of ``E``
        (one subtraction) and of ``diag(s)^(1/2) Q`` is within ``2 u`` (relative, ``u`` the float64
        unit roundoff) of the exact one (the product ``s_i Q_ij`` is even exact for float32
        weights), so ``2 u sqrt(k_h k_w)`` times their Frobenius norms (a bound of a convolution's
        norm by that of its reshaped kernel) is added to ``a`` and ``e``.
        """
        if isinstance(self.inner, nn.Linear):
            if input_shape is not None and tuple(input_shape) != (self.inner.in_features,):
                raise ValueError(
                    f"PotentialStep takes inputs of shape ({self.inner.in_features},), "
                    f"got {tuple(input_shape)}"
                )
            taps = 1
        else:
            if input_shape is not None and (
                len(input_shape) != 3 or input_shape[0] != self.inner.in_channels
            ):
                raise ValueError(
                    f"PotentialStep takes per-sample inputs (C, H, W) with C={self.inner.in_channels}, "
                    f"got {tuple(input_shape)}"
                )
            taps = math.prod(self.inner.kernel_size)
        with torch.no_grad():
            q_w = self.inner.weight.detach().to(device="cpu", dtype=torch.float64)
            p_w = self.outer.weight.detach().to(device="cpu", dtype=torch.float64)
            s = self.steps.detach().to(device="cpu", dtype=torch.float64)
            if isinstance(self.outer, nn.Linear):
                p_w = p_w.T
            tensors = (q_w, p_w, s)
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise ValueError("PotentialStep has NaN or Inf weights or steps: no Lipschitz bound exists")
            if bool((s < 0).any()):
                raise ValueError(
                    "PotentialStep has negative steps: the bound of its class docstring needs s >= 0"
                )
            shape = (-1, *(1,) * (q_w.ndim - 1))
            scaled = s.reshape(shape) * q_w
            m_w = s.sqrt().reshape(shape) * q_w
            rounding = 2.0 * _UNIT_ROUNDOFF * math.sqrt(taps)
            a = self._operator_bound(m_w, input_shape, tight=True) + rounding * float(m_w.norm())
            error = p_w - scaled
            e = self._operator_bound(error, input_shape, tight=False)
            e += rounding * float(scaled.norm() + error.norm())
            q = self._operator_bound(q_w, input_shape, tight=False)
        return (max(1.0, a * a - 1.0) + e * q) * (1.0 + FLOAT64_SLACK)

    def extra_repr(self) -> str:
        return "y = x - outer(relu(inner(x)))"
