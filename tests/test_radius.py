"""Certified radii: exactness on linear classifiers, ordering of the rules, input checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.radius import (
    DEFAULT_EPS,
    CertificationResult,
    binary_radius,
    certification_table,
    certified_accuracy,
    certified_radius,
    certify,
    format_eps,
    parse_eps,
    row_distances,
    split_head,
)


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
    r = certified_radius(logits, y, 1.0, last_layer_weight=w, input_norms=x.norm(dim=1))
    assert torch.all(r <= exact + 1e-12)
    scale = logits.abs().amax(dim=1) / (w.norm(dim=1).amax() + 1e-300)
    assert torch.allclose(r, exact, rtol=1e-9, atol=1e-9 * float(scale.max() + 1))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 12), c=st.integers(2, 8))
def test_global_rule_never_exceeds_the_exact_distance(seed: int, d: int, c: int) -> None:
    w, b, x, y = _linear_problem(seed, 40, d, c)
    logits = x @ w.T + b
    lip = float(torch.linalg.matrix_norm(w, ord=2))
    glob = certified_radius(logits, y, lip, input_norms=x.norm(dim=1))
    last = certified_radius(logits, y, 1.0, last_layer_weight=w, input_norms=x.norm(dim=1))
    assert torch.all(glob <= _exact_boundary_distance(w, b, x, y) + 1e-12)
    assert torch.all(glob <= last + 1e-12)


def test_misclassified_and_ties_get_zero() -> None:
    logits = torch.tensor([[2.0, 1.0], [1.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    r = certified_radius(logits, torch.tensor([0, 0, 0]), 1.0, input_norms=0.0)
    assert r[0] == pytest.approx(1 / math.sqrt(2), rel=1e-9)
    assert r[1] == 0 and r[2] == 0


def test_float32_rounding_slack_makes_radius_smaller() -> None:
    logits = torch.tensor([[1000.0, 999.0]])
    r32 = certified_radius(logits, torch.tensor([0]), 1.0, input_norms=0.0)
    r64 = certified_radius(logits.double(), torch.tensor([0]), 1.0, input_norms=0.0)
    assert 0 < r32 < r64 <= 1 / math.sqrt(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_slack_is_relative_to_the_computation(dtype: torch.dtype) -> None:
    # margin 1, L = 2, ||x|| = 3: the margin loses 2 slack (max|f| + L ||x||) = 2 slack (1 + 6)
    slack = 1e-5 if dtype == torch.float32 else 1e-12
    logits = torch.tensor([[1.0, 0.0]], dtype=dtype)
    r = certified_radius(logits, torch.tensor([0]), 2.0, input_norms=torch.tensor([3.0]))
    assert float(r) == pytest.approx((1.0 - 2 * slack * 7.0) / (2.0 * math.sqrt(2)), rel=1e-12)
    # last-layer rule: L_f = L_g ||W||_2 = 2 * 5 for W = diag(5, 0), ||w_0 - w_1|| = 5
    w = torch.tensor([[5.0, 0.0], [0.0, 0.0]])
    r = certified_radius(logits, torch.tensor([0]), 2.0, last_layer_weight=w, input_norms=3.0)
    assert float(r) == pytest.approx((1.0 - 2 * slack * 31.0) / 10.0, rel=1e-9)


def test_unknown_input_norms_certify_nothing() -> None:
    # Without ||x|| the rounding of the forward pass has no known bound: the norms are a required
    # argument (a clear error, never silent zeros), and an infinite norm certifies nothing.
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1])
    nothing = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(TypeError, match="input_norms"):
        certified_radius(logits, labels, 1.0)  # type: ignore[call-arg]
    assert torch.equal(certified_radius(logits, labels, 1.0, input_norms=math.inf), nothing)
    known = certified_radius(logits, labels, 1.0, input_norms=torch.tensor([1.0, math.inf]))
    assert known[0] > 0 and known[1] == 0


def test_forward_slack_covers_a_bias_that_cancels_the_products() -> None:
    # Linear(3072, 2) in float32, rows +-1/sqrt(3072), x in [0, 1]^3072, biases that cancel w . x up to
    # +-2e-6: the logits are ~1e-6 but their rounding error is that of products of size ~28 (~1e-5).
    # An allowance relative to max|f| (the former rule, input_norms=0 here) certifies more than the exact
    # network's radius; one relative to max|f| + L ||x|| never does.
    n = 3072
    w0 = torch.full((n,), 1.0 / n**0.5)
    w = torch.stack([w0, -w0])
    lip = float(torch.linalg.matrix_norm(w.double(), 2))
    label = torch.tensor([0])
    overclaimed = 0
    for seed in range(200):
        x = torch.rand(1, n, generator=torch.Generator().manual_seed(seed))
        products = (w.double() @ x.double().T).squeeze(1)
        b = (torch.tensor([2e-6, -2e-6], dtype=torch.float64) - products).float()
        layer = nn.Linear(n, 2)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
            f32 = layer(x)
        # float32 products are exact in float64; the float64 sum's error (~1e-13) is far below the margins
        exact = products + b.double()
        # a linear map: the exact distance to the boundary is the margin over ||w_0 - w_1|| (= sqrt(2) lip)
        true = max(float(exact[0] - exact[1]), 0.0) / float((w[0] - w[1]).double().norm())
        norms = x.double().norm(dim=1)
        assert float(certified_radius(f32, label, lip, input_norms=norms)) <= true
        assert float(certified_radius(f32, label, 1.0, last_layer_weight=w, input_norms=norms)) <= true
        overclaimed += float(certified_radius(f32, label, lip, input_norms=0.0)) > true
    assert overclaimed > 0  # the counterexample is real: the logit-relative allowance fails here


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_radius_allowance_is_relative_to_the_computation(dtype: torch.dtype) -> None:
    # one output against a constant: (|f_c - theta_c| - s (max(max_k |f_k|, |theta_c|) + L_c ||x||)) / L_c
    slack = 1e-5 if dtype == torch.float32 else 1e-12
    logits = torch.tensor([[1.0, -0.5, 0.25]], dtype=dtype)
    targets = torch.tensor([[1, 0, 1]])
    r = binary_radius(logits, targets, [2.0, 4.0, 1.0], input_norms=torch.tensor([3.0]), threshold=[0, 0, 2])
    # class 2: 0.25 < theta = 2 decides "negative", but the target says positive: wrong, radius 0
    expected = [(1.0 - slack * (1.0 + 6.0)) / 2.0, (0.5 - slack * (1.0 + 12.0)) / 4.0, 0.0]
    assert r.dtype == torch.float64 and r.shape == (1, 3)
    assert r[0].tolist() == pytest.approx(expected, rel=1e-12)
    # the threshold's magnitude enters the scale when it is the largest number involved
    small = torch.tensor([[0.1, -0.2, 0.3]], dtype=dtype)
    r = binary_radius(small, torch.tensor([[1, 1, 1]]), 1.0, input_norms=0.0, threshold=-2.0)
    expected = [float(v) + 2.0 - slack * 2.0 for v in small[0].double()]
    assert r[0].tolist() == pytest.approx(expected, rel=1e-12)
    # the decision at f_c = theta_c is wrong whatever the target (no side is certain); wrong signs get 0
    r = binary_radius(logits, torch.tensor([[0, 1, 1]]), 1.0, input_norms=0.0, threshold=[1.0, 0.0, 0.0])
    assert r[0, 0] == 0 and r[0, 1] == 0 and r[0, 2] > 0
    # pixels: (N, A, H, W), the per-class bound and threshold broadcast over the positions, the scale
    # is the largest output of the sample (both classes, every pixel)
    maps = torch.tensor([[[[0.5, -0.1]], [[3.0, 2.0]]]], dtype=dtype)
    r = binary_radius(maps, maps > 0, [1.0, 0.5], input_norms=2.0)
    allowance = slack * (3.0 + torch.tensor([1.0, 0.5], dtype=torch.float64) * 2.0)[:, None, None]
    expected_maps = (maps[0].double().abs() - allowance) / torch.tensor([1.0, 0.5]).double()[:, None, None]
    torch.testing.assert_close(r[0], expected_maps, rtol=1e-12, atol=0)


def test_binary_radius_strictness_and_unknown_norms() -> None:
    logits = torch.tensor([[0.5], [-0.25]], dtype=torch.float64)
    targets = torch.tensor([[1], [0]])
    r = binary_radius(logits, targets, 1.0, input_norms=0.0)
    radii = r.flatten()
    # certified only when the radius is strictly above eps
    assert certified_accuracy(radii, float(radii[1])) == 0.5
    with pytest.raises(TypeError, match="input_norms"):
        binary_radius(logits, targets, 1.0)  # type: ignore[call-arg]
    assert torch.equal(binary_radius(logits, targets, 1.0, input_norms=math.inf), torch.zeros(2, 1).double())
    known = binary_radius(logits, targets, 1.0, input_norms=torch.tensor([1.0, math.inf]))
    assert known[0, 0] > 0 and known[1, 0] == 0


@pytest.mark.parametrize(
    ("logits", "targets", "lip", "kwargs", "match"),
    [
        (torch.zeros(3), torch.zeros(3), 1.0, {}, "shape"),
        (torch.zeros(2, 2), torch.zeros(2, 3), 1.0, {}, "targets"),
        (torch.zeros(2, 2), torch.full((2, 2), 2), 1.0, {}, "0/1"),
        (torch.tensor([[float("nan"), 0.0]]), torch.zeros(1, 2), 1.0, {}, "NaN"),
        (torch.zeros(2, 2, dtype=torch.bfloat16), torch.zeros(2, 2), 1.0, {}, "imprecise"),
        (torch.zeros(2, 2), torch.zeros(2, 2), 0.0, {}, "Lipschitz"),
        (torch.zeros(2, 2), torch.zeros(2, 2), [1.0, math.inf], {}, "Lipschitz"),
        (torch.zeros(2, 2), torch.zeros(2, 2), [1.0, 1.0, 1.0], {}, "2 classes"),
        (torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), {}, "one number per class"),
        (torch.zeros(2, 2), torch.zeros(2, 2), 1.0, {"threshold": math.nan}, "thresholds"),
        (torch.zeros(2, 2), torch.zeros(2, 2), 1.0, {"input_norms": torch.ones(3)}, "shape"),
        (torch.zeros(2, 2), torch.zeros(2, 2), 1.0, {"input_norms": -1.0}, ">= 0"),
    ],
)
def test_binary_radius_bad_inputs_raise(
    logits: torch.Tensor, targets: torch.Tensor, lip: object, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        binary_radius(logits, targets, lip, **{"input_norms": 1.0, **kwargs})  # type: ignore[arg-type]


def test_binary_radius_covers_a_bias_that_cancels_the_products() -> None:
    # The binary rule's counterexample: a float32 Linear(3072, 4), rows (1, -0.5, 2, -1) / sqrt(3072) times
    # the all-ones vector, x in [0, 1]^3072, biases that cancel w_c . x up to +-2e-6. The float32 outputs
    # are ~1e-6, their rounding error that of products of size up to ~55 (measured: up to 3e-5). An allowance
    # relative to max|f| alone (the former rule, input_norms=0 here) certifies beyond the exact radius
    # |f_c(x)| / ||w_c|| of the decision; with s (max|f| + L_c ||x||) (here about 3.2e-4 L_c), never, and the
    # worst perturbation of that norm, -sign(f_c) r w_c / ||w_c||, leaves the exact decision unchanged.
    n, scales = 3072, torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    w = (scales[:, None] * torch.ones(4, n, dtype=torch.float64) / n**0.5).float()
    w64 = w.double()  # float32 rows, exact in float64
    row_norms = w64.norm(dim=1)
    lip = row_norms * (1 + 1e-12)  # sound bounds of each output (the norm's rounding is ~1e-16)
    overclaimed = flipped = 0
    for seed in range(100):
        gs = torch.Generator().manual_seed(seed)
        x = torch.rand(1, n, generator=gs)
        products = (w64 @ x.double().T).squeeze(1)
        offsets = (torch.randint(0, 2, (4,), generator=gs).double() * 2 - 1) * 2e-6
        b = (offsets - products).float()
        layer = nn.Linear(n, 4)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
            f32 = layer(x)
        # float32 products are exact in float64; the float64 sum's error (~1e-13) is far below the margins
        exact = products + b.double()
        decisions = f32 > 0  # the decisions the float32 network makes (and which are certified)
        sign = decisions.double()[0] * 2 - 1
        # the exact radius of each decision: its distance to the boundary if the exact sign agrees, else 0
        true = (sign * exact).clamp_min(0.0) / row_norms
        norms = x.double().norm(dim=1)
        new = binary_radius(f32, decisions, lip, input_norms=norms)[0]
        old = binary_radius(f32, decisions, lip, input_norms=0.0)[0]
        assert bool((new <= true).all()), (new, true)
        overclaimed += int((old > true).sum())
        for c in range(4):
            for radius, counter in ((float(new[c]), None), (float(old[c]), "old")):
                if radius <= 0:
                    continue
                moved = x.double()[0] - sign[c] * radius * w64[c] / row_norms[c]
                value = float(w64[c] @ moved + b.double()[c])
                if counter is None:
                    assert value * float(sign[c]) > 0, (seed, c, value)
                else:
                    flipped += value * float(sign[c]) <= 0
    assert overclaimed > 0 and flipped > 0  # the counterexample is real: the former allowance fails here


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
        certified_radius(logits, labels, lip, input_norms=1.0)


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
    # certify passes the norms of the inputs it saw: the radii are certified_radius's with them
    with torch.no_grad():
        logits = torch.cat([model(xb) for xb, _ in loader])
    norms = x.flatten(1).double().norm(dim=1)
    head = model[3].weight
    expected = certified_radius(logits, y, res.lipschitz, last_layer_weight=head, input_norms=norms)
    assert torch.equal(res.radii, expected) and bool((expected > 0).any())
    assert "clean" in res.to_markdown()


@pytest.mark.parametrize(
    ("norms", "match"),
    [
        (torch.ones(3), "shape"),
        (torch.tensor([1.0, -1.0]), ">= 0"),
        (torch.tensor([1.0, float("nan")]), ">= 0"),
        (-2.0, ">= 0"),
        ("1", "tensor or a number"),
    ],
)
def test_bad_input_norms_raise(norms: torch.Tensor | float | str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        certified_radius(torch.zeros(2, 3), torch.tensor([0, 1]), 1.0, input_norms=norms)  # type: ignore[arg-type]


def _near_duplicate_problem(
    c: int, gap: float, dtype: torch.dtype, seed: int = 0, d: int = 64
) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """An identity body and a linear head whose rows come in pairs ``gap`` apart, and inputs near them.

    Rows of norm about 24 make ``||a||^2 + ||b||^2 - 2 a.b`` lose the distance of a pair entirely
    (its rounding, ~1e-16 * 576, is far above ``gap^2``). Each pair gets two inputs on which it wins,
    so the binding constraint of every sample is its near-duplicate partner.
    """
    g = torch.Generator().manual_seed(seed)
    w = 3.0 * torch.randn(c, d, generator=g, dtype=torch.float64)
    u = torch.randn(c // 2, d, generator=g, dtype=torch.float64)
    w[1::2] = w[0::2] + gap * u / u.norm(dim=1, keepdim=True)
    head = nn.Linear(d, c, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.zero_()
    x = 0.5 * w[0::2].repeat_interleave(2, dim=0) + torch.randn(c, d, generator=g, dtype=torch.float64)
    return nn.Sequential(nn.Identity(), head), x, head.weight.detach().to(torch.float64)


@pytest.mark.parametrize("gap", [1e-8, 1e-7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("c", [10, 26, 100])
def test_near_duplicate_rows_never_overclaim(c: int, dtype: torch.dtype, gap: float) -> None:
    """Regression: ``torch.cdist`` above 25 rows lost the distance of nearly equal rows (radius x50).

    The radii of :func:`certify` (forward in the head's dtype) and of the float64 logits of the same
    weights are compared with the exact per-pair distances to the decision boundaries, and an
    attack along ``w_j - w_y`` shows where the prediction really flips: just beyond the exact radius,
    never inside a certified one.
    """
    model, x, w = _near_duplicate_problem(c, gap, dtype)
    b = torch.zeros(c, dtype=torch.float64)
    logits = x @ w.T  # float64, of the stored weights
    y = logits.argmax(dim=1)
    exact = _exact_boundary_distance(w, b, x, y)
    # The exact distances are float64 roots of explicit differences: relative error below 1e-13.
    limit = exact * (1 + 1e-12)
    result = certify(model, [(x.to(dtype), y)], eps=[0.0], progress=False)
    assert result.rule == "last-layer" and result.lipschitz == pytest.approx(1.0)
    radii64 = certified_radius(logits, y, result.lipschitz, last_layer_weight=w, input_norms=x.norm(dim=1))
    for radii in (result.radii, radii64):
        assert torch.all(radii <= limit), float((radii / exact.clamp_min(1e-300)).max())
    assert (radii64 > 0).sum() >= c // 2  # the float64 certificate is not vacuous
    for i in torch.nonzero(radii64 > 0).flatten().tolist():
        yi = int(y[i])
        others = [j for j in range(c) if j != yi]
        dist = torch.stack([(logits[i, yi] - logits[i, j]) / (w[yi] - w[j]).norm() for j in others])
        j = others[int(dist.argmin())]
        direction = (w[j] - w[yi]) / (w[j] - w[yi]).norm()
        inside = x[i] + 0.999 * float(radii64[i]) * direction
        beyond = x[i] + 1.001 * float(exact[i]) * direction
        assert int((inside @ w.T).argmax()) == yi
        assert int((beyond @ w.T).argmax()) != yi


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_row_distances_are_explicit_differences(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 5, generator=g, dtype=torch.float64)
    w[3] = w[4] + 1e-6 * torch.randn(5, generator=g, dtype=torch.float64)
    w[7] = w[8]
    w = w.to(dtype).to(torch.float64)
    exact = torch.stack([(w[i] - w).norm(dim=1) for i in range(37)])
    whole = row_distances(w)
    chunked = row_distances(w, chunk_elements=7)  # one row at a time
    assert torch.equal(whole, chunked) and torch.equal(whole, whole.T)
    # upper bounds, within the documented (F + 8) u inflation plus one ulp of the exact values
    assert torch.all(whole >= exact) and torch.allclose(whole, exact, rtol=1e-14, atol=0.0)
    assert whole[3, 4] > 0 and whole[7, 8] == 0 and whole.diagonal().eq(0).all()


def test_row_distances_of_tiny_rows_do_not_underflow() -> None:
    # 2^-600 apart: every square underflows to 0 in float64, the power-of-two scaling avoids it
    w = torch.ldexp(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64), torch.tensor(-600))
    assert float(w.diff(dim=0).norm()) == 0.0  # what an unscaled norm gives
    got = float(row_distances(w)[0, 1])
    assert got >= math.ldexp(5.0, -600) and got == pytest.approx(math.ldexp(5.0, -600), rel=1e-14)


@pytest.mark.parametrize(
    ("eps", "text"),
    [
        (36 / 255, "36/255"),
        (108 / 255, "108/255"),
        (1.0, "1"),
        (0.0, "0"),
        (0.1, "0.1"),
        (0.5, "0.5"),
        (2.5, "2.5"),
    ],
)
def test_format_eps_is_the_inverse_of_parse_eps(eps: float, text: str) -> None:
    assert format_eps(eps) == text
    assert parse_eps(format_eps(eps)) == pytest.approx(eps, rel=1e-15)


def test_format_eps_of_every_multiple_of_1_255_reads_back() -> None:
    for k in range(1, 255):
        assert format_eps(k / 255) == f"{k}/255"
        assert parse_eps(format_eps(k / 255)) == k / 255
    assert [format_eps(e) for e in DEFAULT_EPS] == ["36/255", "72/255", "108/255", "1"]


def _result(n: int, clean: float, cert: list[float], radius: float, lip: float) -> CertificationResult:
    eps = [36 / 255, 72 / 255]
    return CertificationResult(n, clean, dict(zip(eps, cert, strict=True)), radius, lip, "global")


def test_certification_table_is_one_table_for_one_or_several_results() -> None:
    one = _result(100, 0.8125, [0.5, 0.25], 0.123456, 1.0000002)
    assert one.to_markdown() == "\n".join(
        [
            "| n | clean | cert. ε=36/255 | cert. ε=72/255 | mean radius |",
            "|---:|---:|---:|---:|---:|",
            "| 100 | 81.25% | 50.00% | 25.00% | 0.1235 |",
        ]
    )
    # a run's table: with the Lipschitz bound
    assert certification_table([one], lipschitz=True).splitlines()[2] == (
        "| 100 | 81.25% | 50.00% | 25.00% | 0.1235 | 1.000000 |"
    )
    # a sweep's table: a label column instead of n, and the caller's own columns after
    two = _result(100, 0.5, [0.125, 0.0], 0.05, 2.0)
    table = certification_table(
        [one, two], ["0.5", "5"], label_header="tau", n=False, extra={"train time": ["1.0 s", "2.0 s"]}
    ).splitlines()
    assert table[0] == "| tau | clean | cert. ε=36/255 | cert. ε=72/255 | mean radius | train time |"
    assert table[3] == "| 5 | 50.00% | 12.50% | 0.00% | 0.0500 | 2.0 s |"
    with pytest.raises(ValueError, match="same epsilons"):
        certification_table([one, CertificationResult(1, 1.0, {0.5: 1.0}, 1.0, 1.0, "global")])
    with pytest.raises(ValueError, match="labels"):
        certification_table([one, two], ["only one"])
    with pytest.raises(ValueError, match="cells"):
        certification_table([one], extra={"x": []})
    with pytest.raises(ValueError, match="no certification results"):
        certification_table([])
