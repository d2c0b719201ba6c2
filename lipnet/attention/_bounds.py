"""Shared machinery of the attention modules: bounded multiplicands, gate bounds, normalisation.

Every module of :mod:`lipnet.attention` computes its Lipschitz constant as a float64 scalar
tensor from its current weights (``_raw_bound``). The value of that tensor is the sound bound;
it is also differentiable in the weights so that ``normalize=True`` (division of the output by
the bound) trains the weights knowing that the output is rescaled.

Lemma 1 (block-gated product, ``docs/proofs/attention.md#lemma-gated-product``). For ``y_k = g_k(x) u_k(x)``
with ``|g_k| <= G``, ``||u_k|| <= B``, ``Lip(u) <= a`` and ``Lip(g) <= b``:
``y(x) - y(x') = g(x) (u(x) - u(x')) + (g(x) - g(x')) u(x')``, so ``Lip(y) <= G a + B b``.

Sigmoid-aware refinement (``docs/proofs/attention.md#lemma-sigmoid-refinement``). Let ``g_k = phi(z_k)`` with
``phi = offset + slope * sigmoid`` and ``z`` ``l``-Lipschitz; write ``c = B l``. At a point of
differentiability, ``||(J v)_k|| <= |phi(z_k)| alpha_k + |phi'(z_k)| B beta_k`` with
``sum alpha_k^2 <= a^2 ||v||^2`` and ``sum beta_k^2 <= l^2 ||v||^2``. Cauchy-Schwarz with a weight
``s > 0`` gives ``(p alpha + q B beta)^2 <= (p^2 + q^2 c^2 / s)(alpha^2 + s beta^2 / l^2)``; summing,
``||J|| <= sqrt(sup_t [phi(t)^2 + (c^2 / s) phi'(t)^2] * (a^2 + s))`` for every ``s > 0``, and the
Lipschitz constant of a piecewise-smooth map on R^n is the supremum of ``||J||``. With
``p = sigmoid(t)`` the supremum is that of a quartic polynomial over ``p`` in [0, 1], computed
exactly from the roots of its derivative. Substituting ``s = a^2 s'`` shows the bound equals
``a F(c / a)`` with ``F`` the bound at ``a = 1``. Any ``s`` is sound; a 1-D search picks a good one,
and the smaller of this and the Lemma 1 value ``G a + c * slope / 4`` is returned.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor, nn

from certify.contract import FLOAT64_SLACK
from lipnet.layers.parametrization import EvalTensorCache

__all__: list[str] = []

#: 1 + FLOAT64_SLACK: multiplied into every float64 norm and into every closed-form constant.
SLACK = 1.0 + FLOAT64_SLACK


def spectral_norm(weight: Tensor) -> Tensor:
    """Float64 largest singular value of a matrix (differentiable), times ``1 + FLOAT64_SLACK``."""
    w = weight.to(torch.float64)
    if not torch.isfinite(w.detach()).all():
        raise ValueError("weight contains NaN or Inf: no Lipschitz bound exists")
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2) * SLACK


def rescaled(sound_value: float, surrogate: Tensor) -> Tensor:
    """A tensor whose value is ``sound_value`` and whose gradient is that of ``surrogate``, rescaled.

    Used for bounds that are positively homogeneous in a weight (a convolution's operator norm):
    ``surrogate`` is a differentiable norm of the same weight, and the sound value (from
    :func:`certify.rules.conv.conv_operator_bound`) is ``surrogate * ratio`` with ``ratio`` fixed.
    """
    base = float(surrogate.detach())
    if base == 0.0:
        return surrogate * 0.0 + sound_value
    return surrogate * (sound_value / base) + (sound_value - base * (sound_value / base))


def soft_clamp(x: Tensor, level: float) -> Tensor:
    """``level * tanh(x / level)``: 1-Lipschitz, ``|output| < level`` elementwise, smooth."""
    return level * torch.tanh(x / level)


def ball_projection(x: Tensor, radius: float, dim: int) -> Tensor:
    """Project every vector along ``dim`` onto the closed L2 ball of ``radius``: 1-Lipschitz.

    Projection onto a closed convex set is non-expansive; a product of balls (one per vector) is
    a closed convex set, so the blockwise projection is non-expansive for the Frobenius norm.
    """
    norm = x.norm(dim=dim, keepdim=True)
    return x * (radius / norm.clamp_min(radius))


def check_positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_odd_kernel(kernel_size: int) -> int:
    """``kernel_size`` checked as an odd int >= 1, so that zero padding ``k // 2`` keeps the size."""
    check_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (same-size zero padding), got {kernel_size}")
    return kernel_size


def check_maxmin_channels(name: str, value: int) -> int:
    """``value`` checked as a channel count that :class:`~lipnet.activations.MaxMin` splits into pairs."""
    check_int(name, value)
    if value % 2:
        raise ValueError(f"{name} must be even (MaxMin pairs channels), got {value}")
    return value


def _gate_sup(k2_over_s: np.ndarray, offset: float, slope: float) -> np.ndarray:
    """``sup_{p in [0,1]} (offset + slope p)^2 + K slope^2 p^2 (1-p)^2`` for each ``K`` of an array."""
    # Critical points: the derivative divided by 2 slope is
    # 2 K slope p^3 - 3 K slope p^2 + (K slope + slope) p + offset = 0, solved for all K at once
    # as the eigenvalues of the companion matrices (K > 0 throughout).
    ks = k2_over_s * slope
    companion = np.zeros((ks.size, 3, 3))
    companion[:, 0, 0] = 1.5
    companion[:, 0, 1] = -(ks + slope) / (2.0 * ks)
    companion[:, 0, 2] = -offset / (2.0 * ks)
    companion[:, 1, 0] = 1.0
    companion[:, 2, 1] = 1.0
    roots = np.linalg.eigvals(companion)
    # Every root's real part is clipped into [0, 1]: evaluating at extra points of [0, 1] can
    # only raise the computed maximum, never miss a real critical point reported as complex.
    p = np.concatenate([np.clip(roots.real, 0.0, 1.0), np.zeros((ks.size, 1)), np.ones((ks.size, 1))], axis=1)
    values = (offset + slope * p) ** 2 + k2_over_s[:, None] * (slope * p * (1.0 - p)) ** 2
    return values.max(axis=1)


@functools.lru_cache(maxsize=4096)
def _refined_unit(k: float, offset: float, slope: float) -> float:
    """The refined bound at ``a = 1``: ``min_s sqrt(sup_p h_s(p) (1 + s))`` over a log-grid of ``s``.

    Every ``s`` gives a sound bound, so the grid only decides how close to the best one it gets:
    a coarse grid over 20 decades, then a fine one around its best point.
    """
    gate_max = offset + slope
    if k == 0.0:
        return gate_max

    def values(log_s: np.ndarray) -> np.ndarray:
        s = np.power(10.0, log_s)
        return np.sqrt(_gate_sup(k * k / s, offset, slope) * (1.0 + s))

    coarse = np.linspace(-10.0, 10.0, 401)
    best = coarse[int(np.argmin(values(coarse)))]
    fine = np.linspace(best - 0.05, best + 0.05, 201)
    return float(values(fine).min())


def sigmoid_gate_bound(a: float, c: float, offset: float = 0.0, slope: float = 1.0) -> float:
    """Bound of ``Lip(g * u)`` for a gate ``offset + slope * sigmoid(z)`` (see the module docstring).

    ``a``: Lipschitz bound of the multiplicand ``u``; ``c``: block-norm bound ``B`` times the
    Lipschitz bound ``l`` of the gate logits ``z``. Returns ``min(Lemma 1, refined) * SLACK``.
    """
    if a < 0.0 or c < 0.0 or not (math.isfinite(a) and math.isfinite(c)):
        raise ValueError(f"gate bound needs finite non-negative a and c, got a={a!r}, c={c!r}")
    naive = (offset + slope) * a + c * slope / 4.0
    if a == 0.0:
        return naive * SLACK
    return min(naive, a * _refined_unit(c / a, offset, slope)) * SLACK


def sigmoid_gate_bound_tensor(a: Tensor, c: Tensor, offset: float = 0.0, slope: float = 1.0) -> Tensor:
    """:func:`sigmoid_gate_bound` as a float64 tensor whose value is exactly the sound bound.

    Its gradient in ``a`` and ``c`` is the bound's own derivative (central differences of the
    float64 function), so a normalised module's divisor responds to its weights.
    """
    a0, c0 = float(a.detach()), float(c.detach())
    value = sigmoid_gate_bound(a0, c0, offset, slope)
    if not (a.requires_grad or c.requires_grad):
        return torch.tensor(value, dtype=torch.float64, device=a.device)
    step_a, step_c = 1e-5 * max(a0, 1e-12), 1e-5 * max(c0, 1e-12)
    da = (
        sigmoid_gate_bound(a0 + step_a, c0, offset, slope)
        - sigmoid_gate_bound(max(a0 - step_a, 0.0), c0, offset, slope)
    ) / (a0 + step_a - max(a0 - step_a, 0.0))
    dc = (
        sigmoid_gate_bound(a0, c0 + step_c, offset, slope)
        - sigmoid_gate_bound(a0, max(c0 - step_c, 0.0), offset, slope)
    ) / (c0 + step_c - max(c0 - step_c, 0.0))
    # (a - a0) and (c - c0) are exactly zero in value: the returned value is ``value`` bit for bit.
    return value + da * (a.to(torch.float64) - a0) + dc * (c.to(torch.float64) - c0)


def lambert_w0_upper(y: float) -> float:
    """An upper bound ``w >= W_0(y)`` of the principal Lambert W function for ``y >= 0``.

    Newton's method on ``w e^w = y``, then ``w`` is raised until ``w e^w >= y`` holds in float64;
    ``w e^w`` is increasing on ``w >= 0``, so the returned ``w`` is not below the root.
    """
    if y < 0.0 or not math.isfinite(y):
        raise ValueError(f"lambert_w0_upper needs a finite y >= 0, got {y!r}")
    w = math.log1p(y)
    for _ in range(100):
        step = (w * math.exp(w) - y) / (math.exp(w) * (w + 1.0))
        w -= step
        if abs(step) <= 1e-15 * max(1.0, abs(w)):
            break
    w = max(w, 0.0) * (1.0 + 1e-12)
    while w * math.exp(w) < y:
        w = w * (1.0 + 1e-12) + 1e-300
    return w


class NormalizedModule(nn.Module):
    """Base of the attention modules: ``lipschitz_bound`` from ``_raw_bound``, optional normalisation.

    Subclasses implement ``_raw_bound(input_shape) -> Tensor`` (float64 scalar, the sound bound
    of the unnormalised map for that per-sample input shape, or for every shape when ``None``).
    With ``normalize=True`` the forward divides the output by that tensor, cast to the output
    dtype; the normalised map's bound is then ``raw / fl(raw)``, at most ``1 / (1 - u)`` with ``u`` the
    unit roundoff of the module's dtype (the rounding of the divisor), and it is what
    :meth:`lipschitz_bound` returns: at most 1-Lipschitz up to that rounding.

    The forward's divisor (:meth:`_divisor_value`, the raw bound unless a subclass divides by
    something else) is cached in eval mode with the layers' cache
    (:class:`lipnet.layers.parametrization.EvalTensorCache`): reused while no parameter or buffer of the
    module changed (their version counters, bumped by optimiser steps and ``load_state_dict``, are in the
    key, with the input shape), recomputed in training mode and whenever an autograd graph is
    needed. The value is the same tensor the uncached forward divided by, so outputs are unchanged.
    :meth:`lipschitz_bound` always recomputes.
    """

    normalize: bool

    def __init__(self) -> None:
        super().__init__()
        self._divisor_cache = EvalTensorCache()

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        raise NotImplementedError

    def _divisor_value(self, input_shape: tuple[int, ...] | None) -> Tensor:
        """What the normalised forward divides by (float64): the raw bound for that input shape."""
        return self._raw_bound(input_shape)

    def _divisor(self, input_shape: tuple[int, ...] | None) -> Tensor:
        """:meth:`_divisor_value`, reused in eval mode while the weights are unchanged (class docstring)."""
        return self._divisor_cache.get(
            self.training,
            [*self.parameters(), *self.buffers()],
            lambda: self._divisor_value(input_shape),
            extra=(input_shape,),
        )

    def _dtype(self) -> torch.dtype:
        ref = next(iter(self.parameters()), None)
        return ref.dtype if ref is not None else torch.get_default_dtype()

    def _normalized(self, y: Tensor, input_shape: tuple[int, ...] | None) -> Tensor:
        if not self.normalize:
            return y
        return y / self._divisor(input_shape).to(device=y.device, dtype=y.dtype)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 upper bound of the L2 Lipschitz constant (for ``input_shape``, or every shape)."""
        shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        with torch.no_grad():
            if not self.normalize:
                return float(self._raw_bound(shape))
            dtype = self._dtype()
            if shape is None:
                return 1.0 / (1.0 - torch.finfo(dtype).eps / 2.0)
            raw = self._raw_bound(shape)
            return float(raw) / float(raw.to(dtype).to(torch.float64))
