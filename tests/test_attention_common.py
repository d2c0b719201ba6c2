"""Checks shared by the attention tests, and tests of the bound machinery in ``lipnet.attention._bounds``."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from certify.exact import jacobian_spectral_norm
from lipnet.attention._bounds import ball_projection, lambert_w0_upper, sigmoid_gate_bound

TOL = 1e-6


def batched(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda z: fn(z.unsqueeze(0)).squeeze(0)


def ascent_lipschitz(fn: Callable[[Tensor], Tensor], x0: Tensor, steps: int = 4) -> float:
    """Largest ``||J(x)||`` along a gradient-ascent path of ``||J(x) v||`` (``v`` by power iteration)."""
    f = batched(fn)
    x = x0.clone()
    v = torch.randn_like(x)
    best = jacobian_spectral_norm(fn, x)
    for _ in range(steps):
        for _ in range(3):
            v = v / v.norm()
            _, jv = torch.func.jvp(f, (x,), (v,))
            _, vjp = torch.func.vjp(f, x)
            (v,) = vjp(jv)
        v = v / v.norm()
        grad = torch.func.grad(lambda z, v=v: torch.func.jvp(f, (z,), (v,))[1].norm())(x)
        x = x + 0.2 * x0.norm() * grad / grad.norm().clamp_min(1e-300)
        best = max(best, jacobian_spectral_norm(fn, x))
    return best


def measured_lipschitz(
    module: nn.Module, shape: tuple[int, ...], scales: tuple[float, ...], seed: int = 0
) -> float:
    """Max local Lipschitz constant over random points at several input scales and ascent paths."""
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for scale in scales:
        x0 = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        best = max(best, ascent_lipschitz(module, x0))
    return best


def sharpen(module: nn.Module, factor: float) -> nn.Module:
    """Scale every weight so that the gates are far from constant (a harder test of the bound)."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(factor)
    return module


def grads_flow(module: nn.Module, x: Tensor) -> None:
    """Every parameter gets a finite, not identically zero gradient from a scalar loss."""
    module.zero_grad()
    module(x).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient in {name}"


# ---------------------------------------------------------------------------------------------
# The bound machinery itself


def _brute_gate_bound(a: float, c: float, offset: float, slope: float) -> float:
    """Refined bound by dense grids over ``p`` and ``s`` (each ``s`` sound; grid max <= true sup)."""
    p = np.linspace(0.0, 1.0, 20001)
    best = math.inf
    for s in np.logspace(-4, 4, 801):
        sup = np.max((offset + slope * p) ** 2 + (c * c / s) * (slope * p * (1 - p)) ** 2)
        best = min(best, math.sqrt(sup * (a * a + s)))
    return best


@pytest.mark.parametrize(
    ("a", "c", "offset", "slope"), [(1.0, 1.0, 0.0, 1.0), (1.0, 4.0, 0.0, 1.0), (2.0, 3.0, 0.5, 0.5)]
)
def test_gate_bound_matches_brute_force_and_the_notes(
    a: float, c: float, offset: float, slope: float
) -> None:
    bound = sigmoid_gate_bound(a, c, offset, slope)
    brute = _brute_gate_bound(a, c, offset, slope)
    assert bound <= (offset + slope) * a + c * slope / 4.0 + 1e-12  # never worse than Lemma 1
    assert brute * (1 - 1e-3) <= bound <= brute * (1 + 1e-3)


def test_gate_bound_holds_and_is_not_vacuous_on_a_scalar_gate() -> None:
    # y = sigmoid(l x2) * B tanh(x1 / B) in R^2: a = 1, c = B l; the Jacobian norm never exceeds the bound.
    for b, ell in ((1.0, 1.0), (2.0, 2.0), (0.5, 8.0)):
        bound = sigmoid_gate_bound(1.0, b * ell)
        x = torch.stack(
            torch.meshgrid(torch.linspace(-8, 8, 161), torch.linspace(-8, 8, 161), indexing="ij"), -1
        )
        x = x.reshape(-1, 2).double()
        t, z = b * torch.tanh(x[:, 0] / b), ell * x[:, 1]
        # rows of the 1x2 Jacobian: (sigmoid(z) (1 - tanh^2), sigmoid'(z) l t)
        j = torch.stack([z.sigmoid() * (1 - (t / b) ** 2), z.sigmoid() * (1 - z.sigmoid()) * ell * t], 1)
        measured = j.norm(dim=1).max().item()
        assert measured <= bound * (1 + TOL)
        assert measured >= 0.6 * bound  # the soft clamp's saturation keeps the two terms apart


def test_lambert_upper_bound() -> None:
    for y in (0.0, 0.1, 1.0, 64 / math.e, 1e4):
        w = lambert_w0_upper(y)
        assert w * math.exp(w) >= y
        assert (w * (1 - 1e-9)) * math.exp(w * (1 - 1e-9)) <= y * (1 + 1e-6) + 1e-300
    with pytest.raises(ValueError):
        lambert_w0_upper(-1.0)


def test_ball_projection_is_non_expansive_and_bounded() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 5, 3, generator=gen) * 4, torch.randn(50, 5, 3, generator=gen) * 4
    px, py = ball_projection(x, 1.5, dim=-1), ball_projection(y, 1.5, dim=-1)
    assert px.norm(dim=-1).max() <= 1.5 * (1 + 1e-6)
    assert ((px - py).flatten(1).norm(dim=1) <= (x - y).flatten(1).norm(dim=1) * (1 + 1e-6)).all()
    small = 0.1 * x / x.norm(dim=-1, keepdim=True)
    assert torch.allclose(ball_projection(small, 1.5, dim=-1), small)
