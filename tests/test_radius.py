"""Certified radii: exactness on linear classifiers, ordering of the rules, input checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.radius import certified_accuracy, certified_radius, certify, parse_eps, split_head


def _linear_problem(
    seed: int, n: int, d: int, c: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return w, b, x, y


def _exact_boundary_distance(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Distance from x to the nearest point where another class ties with y (0 if misclassified)."""
    f = x @ w.T + b
    out = torch.zeros(len(y), dtype=torch.float64)
    for i in range(len(y)):
        if f[i].argmax() != y[i] or (f[i] == f[i, y[i]]).sum() > 1:
            continue
        d = [(f[i, y[i]] - f[i, j]) / (w[y[i]] - w[j]).norm() for j in range(w.shape[0]) if j != y[i]]
        out[i] = min(d)
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 12), c=st.integers(2, 8))
def test_last_layer_rule_is_exact_for_linear_classifiers(seed: int, d: int, c: int) -> None:
    w, b, x, y = _linear_problem(seed, 40, d, c)
    logits = x @ w.T + b
    exact = _exact_boundary_distance(w, b, x, y)
    r = certified_radius(logits, y, 1.0, last_layer_weight=w)
    assert torch.all(r <= exact + 1e-12)
    scale = logits.abs().amax(dim=1) / (w.norm(dim=1).amax() + 1e-300)
    assert torch.allclose(r, exact, rtol=1e-9, atol=1e-9 * float(scale.max() + 1))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 12), c=st.integers(2, 8))
def test_global_rule_never_exceeds_the_exact_distance(seed: int, d: int, c: int) -> None:
    w, b, x, y = _linear_problem(seed, 40, d, c)
    logits = x @ w.T + b
    lip = float(torch.linalg.matrix_norm(w, ord=2))
    glob = certified_radius(logits, y, lip)
    last = certified_radius(logits, y, 1.0, last_layer_weight=w)
    assert torch.all(glob <= _exact_boundary_distance(w, b, x, y) + 1e-12)
    assert torch.all(glob <= last + 1e-12)


def test_misclassified_and_ties_get_zero() -> None:
    logits = torch.tensor([[2.0, 1.0], [1.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    r = certified_radius(logits, torch.tensor([0, 0, 0]), 1.0)
    assert r[0] == pytest.approx(1 / math.sqrt(2), rel=1e-9)
    assert r[1] == 0 and r[2] == 0


def test_float32_rounding_slack_makes_radius_smaller() -> None:
    logits = torch.tensor([[1000.0, 999.0]])
    r32 = certified_radius(logits, torch.tensor([0]), 1.0)
    r64 = certified_radius(logits.double(), torch.tensor([0]), 1.0)
    assert 0 < r32 < r64 <= 1 / math.sqrt(2)


def test_certified_accuracy_is_strict() -> None:
    radii = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    assert certified_accuracy(radii, 1.0) == 0.25
    assert certified_accuracy(radii, "0") == 0.75


@pytest.mark.parametrize(("text", "value"), [("36/255", 36 / 255), ("0.5", 0.5), (1, 1.0), ("255/255", 1.0)])
def test_parse_eps(text: str | int, value: float) -> None:
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["abc", "-1", "1/0", float("nan"), float("inf")])
def test_parse_eps_rejects(bad: str | float) -> None:
    with pytest.raises(ValueError):
        parse_eps(bad)


@pytest.mark.parametrize(
    ("logits", "labels", "lip", "match"),
    [
        (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), 1.0, "NaN"),
        (torch.zeros(2, 3), torch.tensor([0]), 1.0, "shape"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), 1.0, "out of range"),
        (torch.zeros(2, 3), torch.tensor([0, -1]), 1.0, "out of range"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), 1.0, "integer"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), 0.0, "> 0"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), float("inf"), "> 0"),
        (torch.zeros(2, 3, dtype=torch.bfloat16), torch.tensor([0, 1]), 1.0, "imprecise"),
        (torch.zeros(2, 1), torch.tensor([0, 0]), 1.0, "C >= 2"),
    ],
)
def test_bad_inputs_raise(logits: torch.Tensor, labels: torch.Tensor, lip: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        certified_radius(logits, labels, lip)


def test_certify_uses_the_last_layer_rule_for_a_linear_head() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    assert split_head(model) is not None
    x = torch.rand(64, 3, 2, 2)
    y = torch.randint(0, 4, (64,))
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    res = certify(model, loader, eps=("36/255", 0.5), progress=False)
    assert res.rule == "last-layer"
    assert res.n == 64
    body_bound = float(torch.linalg.matrix_norm(model[1].weight.double(), ord=2))
    assert res.lipschitz == pytest.approx(body_bound, rel=1e-6)
    glob = certify(model, loader, eps=("36/255",), last_layer=False, progress=False)
    assert glob.rule == "global"
    assert torch.all(glob.radii <= res.radii + 1e-12)
    assert "clean" in res.to_markdown()
