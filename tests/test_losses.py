"""Losses: formulas, limits in tau, parity with deel-torchlip, numerical safety and input checks."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from deel.torchlip.modules import loss as deel
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnet.losses import (
    HKR,
    KR,
    Focal,
    MulticlassHinge,
    Poly1,
    PolyN,
    TauBCE,
    TauCrossEntropy,
    check_arguments,
    create,
    declared_parameters,
    list_losses,
    loss_class,
    parameter_rule,
    sweepable,
)

FAST = settings(max_examples=25, deadline=None)

# The keyword arguments other modules code against, one working set per name.
FACTORY_KWARGS: dict[str, dict[str, object]] = {
    "tau_ce": {"tau": 5.0, "offset": 0.1},
    "hinge": {"margin": 0.2},
    "kr": {},
    "hkr": {"alpha": 0.9, "margin": 0.2},
    "tau_bce": {"tau": 5.0},
    "focal": {"gamma": 2.0, "alpha": [1.0, 0.5, 2.0, 1.0]},
    "poly1": {"epsilon": 1.0, "tau": 5.0},
    "polyn": {"epsilons": [1.0, -0.2], "tau": 5.0},
}


def _problem(seed: int, n: int, c: int, scale: float = 1.0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, c, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    return logits, labels


def _shifted(logits: torch.Tensor, labels: torch.Tensor, offset: float) -> torch.Tensor:
    """Reference for the margin offset: add it to every non-target logit."""
    return logits + offset * (1 - F.one_hot(labels, logits.shape[1]).to(logits.dtype))


def _hinge0(logits: torch.Tensor, labels: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """max(0, max_{j != y} f_j + offset - f_y) per sample."""
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -math.inf).amax(dim=1)
    return (others + offset - logits.gather(1, labels[:, None]).squeeze(1)).clamp(min=0)


def _p_true(logits: torch.Tensor, labels: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    return torch.softmax(tau * logits, dim=1).gather(1, labels[:, None]).squeeze(1)


# --- parity with deel-torchlip 1.0.5 ---------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 24),
    c=st.integers(2, 12),
    tau=st.floats(0.05, 50.0),
    margin=st.floats(0.0, 2.0),
    alpha=st.floats(0.0, 1.0),
)
def test_matches_deel_torchlip(seed: int, n: int, c: int, tau: float, margin: float, alpha: float) -> None:
    f, y = _problem(seed, n, c)
    onehot = F.one_hot(y, c).to(f.dtype)
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(TauCrossEntropy(tau)(f, y), deel.TauCrossEntropyLoss(tau)(f, y), **close)
    torch.testing.assert_close(TauBCE(tau)(f, y), deel.TauBCEWithLogitsLoss(tau)(f, onehot), **close)
    hinge = deel.HingeMulticlassLoss(margin)(f, onehot)
    torch.testing.assert_close(MulticlassHinge(margin)(f, y), hinge, **close)
    # Small batches leave classes absent, which exercises the empty-group convention of KR.
    torch.testing.assert_close(KR()(f, y), -deel.KRMulticlassLoss()(f, onehot), **close)
    hkr = deel.HKRMulticlassLoss(alpha, margin)(f, onehot)
    torch.testing.assert_close(HKR(alpha, margin)(f, y), hkr, **close)


# --- tau-cross-entropy and its limits --------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 10_000), c=st.integers(2, 10), tau=st.floats(0.01, 100.0), offset=st.floats(0.0, 1.0)
)
def test_tau_ce_is_scaled_cross_entropy_with_offset(seed: int, c: int, tau: float, offset: float) -> None:
    f, y = _problem(seed, 16, c, scale=3.0)
    expected = F.cross_entropy(tau * _shifted(f, y, offset), y) / tau
    torch.testing.assert_close(TauCrossEntropy(tau, offset=offset)(f, y), expected, rtol=1e-12, atol=1e-12)


@FAST
@given(
    seed=st.integers(0, 10_000),
    c=st.integers(2, 10),
    log_tau=st.floats(-3.0, 6.0),
    scale=st.floats(0.01, 100.0),
    offset=st.floats(0.0, 2.0),
)
def test_large_tau_approaches_the_hinge(
    seed: int, c: int, log_tau: float, scale: float, offset: float
) -> None:
    """hinge_o <= tau-CE <= hinge_o + log(C)/tau for every tau, hence tau-CE -> hinge_o as tau -> inf."""
    tau = 10.0**log_tau
    f, y = _problem(seed, 12, c, scale=scale)
    loss = TauCrossEntropy(tau, offset=offset)(f, y)
    hinge = _hinge0(f, y, offset).mean()
    slack = 1e-13 * (1 + hinge.abs())
    assert hinge - slack <= loss <= hinge + math.log(c) / tau + slack


def test_large_tau_limit_converges() -> None:
    f, y = _problem(0, 64, 10)
    gaps = [float(TauCrossEntropy(tau)(f, y) - _hinge0(f, y).mean()) for tau in (1.0, 1e2, 1e4, 1e6)]
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False))
    assert gaps[-1] <= math.log(10) / 1e6


@FAST
@given(
    seed=st.integers(0, 10_000),
    c=st.integers(2, 10),
    log_tau=st.floats(-6.0, -1.0),
    scale=st.floats(0.01, 10.0),
    offset=st.floats(0.0, 1.0),
)
def test_small_tau_approaches_the_linear_kr_like_loss(
    seed: int, c: int, log_tau: float, scale: float, offset: float
) -> None:
    """0 <= tau-CE - log(C)/tau - (mean_j f'_j - f_y) <= tau * mean(R'^2) / 8 (R' = range of f')."""
    tau = 10.0**log_tau
    f, y = _problem(seed, 12, c, scale=scale)
    shifted = _shifted(f, y, offset)
    linear = (shifted.mean(dim=1) - f.gather(1, y[:, None]).squeeze(1)).mean()
    spread = (shifted.amax(dim=1) - shifted.amin(dim=1)).pow(2).mean()
    rest = TauCrossEntropy(tau, offset=offset)(f, y) - math.log(c) / tau - linear
    rounding = 1e-14 / tau
    assert -rounding <= rest <= tau * spread / 8 + rounding


# --- numerical safety --------------------------------------------------------------------------------


def _all_losses(tau: float) -> list[torch.nn.Module]:
    return [
        create("tau_ce", tau=tau, offset=0.3),
        create("hinge", margin=0.2),
        create("kr"),
        create("hkr", alpha=0.5, margin=0.2),
        create("tau_bce", tau=tau, offset=0.3),
        create("focal", gamma=0.5, tau=tau, offset=0.3),
        create("focal", gamma=2.0, alpha=[0.2, 1.0, 3.0, 1.0, 1.0], tau=tau),
        create("poly1", epsilon=2.0, tau=tau, gamma=0.5),
        create("polyn", epsilons=[1.0, -0.5, 0.3], tau=tau, gamma=2.0, offset=0.3),
    ]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), log_tau=st.floats(-3.0, 3.0), log_scale=st.floats(-3.0, 4.0))
def test_gradients_finite_for_extreme_tau_and_large_logits(
    seed: int, log_tau: float, log_scale: float
) -> None:
    f, y = _problem(seed, 8, 5, scale=10.0**log_scale, dtype=torch.float32)
    for loss_fn in _all_losses(10.0**log_tau):
        logits = f.clone().requires_grad_(True)
        loss = loss_fn(logits, y)
        loss.backward()
        assert torch.isfinite(loss), loss_fn
        assert torch.isfinite(logits.grad).all(), loss_fn


@pytest.mark.parametrize("tau", [1e-3, 1e3])
def test_confident_and_hopeless_samples_have_finite_gradients(tau: float) -> None:
    f = torch.tensor([[1e4, -1e4, 0.0, 0.0, 0.0], [-1e4, 1e4, 0.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])
    for loss_fn in _all_losses(tau):
        logits = f.clone().requires_grad_(True)
        loss_fn(logits, y).backward()
        assert torch.isfinite(logits.grad).all(), loss_fn


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype: torch.dtype) -> None:
    f, y = _problem(1, 16, 5, dtype=torch.float32)
    half = f.to(dtype)
    for loss_fn in _all_losses(10.0):
        out = loss_fn(half, y)
        assert out.dtype == torch.float32, loss_fn
        torch.testing.assert_close(out, loss_fn(half.float(), y), rtol=0, atol=0)


# --- PolyLoss and focal --------------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 10_000),
    tau=st.floats(0.01, 100.0),
    gamma=st.floats(0.0, 4.0),
    offset=st.floats(0.0, 1.0),
)
def test_zero_epsilon_gives_the_base_loss_exactly(seed: int, tau: float, gamma: float, offset: float) -> None:
    f, y = _problem(seed, 16, 6, scale=2.0)
    ce = TauCrossEntropy(tau, offset=offset)(f, y)
    assert torch.equal(Poly1(0.0, tau=tau, offset=offset)(f, y), ce)
    assert torch.equal(PolyN([0.0, 0.0, 0.0], tau=tau, offset=offset)(f, y), ce)
    assert torch.equal(Focal(0.0, tau=tau, offset=offset)(f, y), ce)
    focal = Focal(gamma, tau=tau, offset=offset)(f, y)
    assert torch.equal(Poly1(0.0, tau=tau, gamma=gamma, offset=offset)(f, y), focal)
    assert torch.equal(PolyN([0.0], tau=tau, gamma=gamma, offset=offset)(f, y), focal)


@FAST
@given(
    seed=st.integers(0, 10_000), tau=st.floats(0.1, 10.0), eps=st.floats(-1.0, 5.0), gamma=st.floats(0.0, 3.0)
)
def test_poly1_formula(seed: int, tau: float, eps: float, gamma: float) -> None:
    f, y = _problem(seed, 16, 6, scale=2.0)
    p = _p_true(f, y, tau)
    expected = ((1 - p) ** gamma * -torch.log(p) + eps * (1 - p) ** (gamma + 1)).mean() / tau
    torch.testing.assert_close(Poly1(eps, tau=tau, gamma=gamma)(f, y), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(Poly1(eps, tau=tau, gamma=gamma)(f, y), PolyN([eps], tau=tau, gamma=gamma)(f, y))


@FAST
@given(seed=st.integers(0, 10_000), eps=st.floats(-1.0, 5.0))
def test_poly1_gradient_of_the_true_logit(seed: int, eps: float) -> None:
    """Leng et al.: d/d f_y [CE + eps (1 - p_y)] = -(1 - p_y)(1 + eps p_y)."""
    f, y = _problem(seed, 1, 5, scale=2.0)
    logits = f.clone().requires_grad_(True)
    Poly1(eps)(logits, y).backward()
    p = _p_true(f, y)
    torch.testing.assert_close(logits.grad[0, y[0]], (-(1 - p) * (1 + eps * p))[0], rtol=1e-10, atol=1e-12)


@FAST
@given(
    q=st.floats(1e-3, 0.95),
    n_terms=st.integers(1, 6),
    tau=st.floats(0.1, 10.0),
    gamma=st.sampled_from([0.0, 0.5, 2.0]),
)
def test_polyn_terms_are_the_taylor_coefficients_of_ce(
    q: float, n_terms: int, tau: float, gamma: float
) -> None:
    """-log p = sum_j (1-p)^j / j: epsilon_j = -1/j leaves (1-p)^gamma sum_{j>N} (1-p)^j / j."""
    # Logits for which softmax(tau f) puts exactly 1 - q on the true class 0 (C = 4).
    rest = math.log(q / (3 * (1 - q))) / tau
    f = torch.tensor([[0.0, rest, rest, rest]], dtype=torch.float64)
    y = torch.tensor([0])
    j = torch.arange(n_terms + 1, 2000, dtype=torch.float64)
    tail = (q**j / j).sum()  # q <= 0.95, so the terms left out are < 1e-40
    got = PolyN([-1.0 / k for k in range(1, n_terms + 1)], tau=tau, gamma=gamma)(f, y) * tau
    # Removing the leading terms cancels: the absolute error is a few ulps of CE ~ q.
    rounding = 1e-14 * q
    torch.testing.assert_close(got, q**gamma * tail, rtol=1e-9, atol=rounding)
    # The remainder is of order N+1 in (1 - p): 0 <= tail <= q^(N+1) / ((N+1)(1-q)).
    assert -rounding <= got <= q ** (gamma + n_terms + 1) / ((n_terms + 1) * (1 - q)) + rounding


@FAST
@given(
    seed=st.integers(0, 10_000),
    gamma=st.floats(0.0, 4.0),
    tau=st.floats(0.1, 10.0),
    offset=st.floats(0.0, 1.0),
)
def test_focal_formula_with_class_weights(seed: int, gamma: float, tau: float, offset: float) -> None:
    f, y = _problem(seed, 16, 4, scale=2.0)
    weights = [0.25, 1.0, 2.0, 0.5]
    p = _p_true(_shifted(f, y, offset), y, tau)
    alpha_t = torch.tensor(weights, dtype=torch.float64)[y]
    expected = (-alpha_t * (1 - p) ** gamma * torch.log(p)).mean() / tau
    got = Focal(gamma, alpha=weights, tau=tau, offset=offset)(f, y)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_focal_weights_are_a_non_persistent_buffer() -> None:
    loss_fn = Focal(2.0, alpha=torch.tensor([1.0, 2.0, 3.0]))
    assert "alpha" not in loss_fn.state_dict()
    assert loss_fn.to(torch.float64).alpha.dtype == torch.float64
    f, y = _problem(3, 8, 3)
    assert torch.isfinite(loss_fn(f, y))


# --- TauBCE --------------------------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 10_000),
    tau=st.floats(0.01, 100.0),
    offset=st.floats(0.0, 1.0),
    pos_weight=st.floats(0.1, 10.0),
)
def test_tau_bce_formula_multi_hot_and_indices(
    seed: int, tau: float, offset: float, pos_weight: float
) -> None:
    f, y = _problem(seed, 16, 5, scale=2.0)
    g = torch.Generator().manual_seed(seed + 1)
    multi_hot = (torch.rand(16, 5, generator=g) < 0.4).double()
    sign = 2 * multi_hot - 1
    expected = (
        F.binary_cross_entropy_with_logits(
            tau * (f - sign * offset), multi_hot, pos_weight=torch.full((5,), pos_weight, dtype=torch.float64)
        )
        / tau
    )
    loss_fn = TauBCE(tau, offset=offset, pos_weight=pos_weight)
    torch.testing.assert_close(loss_fn(f, multi_hot), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_fn(f, y), loss_fn(f, F.one_hot(y, 5).double()), rtol=0, atol=0)


@FAST
@given(seed=st.integers(0, 10_000), log_tau=st.floats(-2.0, 6.0))
def test_tau_bce_large_tau_is_the_one_vs_all_hinge(seed: int, log_tau: float) -> None:
    """0 <= BCE(tau z, t)/tau - relu(-(2t-1) z) <= log(2)/tau per entry."""
    tau = 10.0**log_tau
    f, y = _problem(seed, 12, 4, scale=3.0)
    sign = 2 * F.one_hot(y, 4).double() - 1
    hinge = F.relu(-sign * f).mean()
    loss = TauBCE(tau)(f, y)
    assert hinge - 1e-12 <= loss <= hinge + math.log(2) / tau + 1e-12


# --- hinge, KR, HKR -------------------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 10_000),
    c=st.integers(2, 8),
    margin=st.floats(0.0, 2.0),
    deficit=st.floats(0.0, 1.0),
)
def test_hinge_margin_semantics(seed: int, c: int, margin: float, deficit: float) -> None:
    """Zero loss iff f_y >= m/2 and f_j <= -m/2: the logit margin is then >= m."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (6,), generator=g)
    mask = F.one_hot(y, c).bool()
    slack = torch.rand(6, c, generator=g, dtype=torch.float64)
    f = torch.where(mask, margin / 2 + slack, -margin / 2 - slack)
    assert MulticlassHinge(margin)(f, y) == 0
    margins = f.gather(1, y[:, None]).squeeze(1) - f.masked_fill(mask, -math.inf).amax(dim=1)
    assert (margins >= margin).all()
    # Lowering every true logit below m/2 by `deficit` costs (C - 1) * deficit / C per sample.
    lowered = torch.where(mask, margin / 2 - deficit, f)
    expected = torch.tensor((c - 1) * deficit / c, dtype=torch.float64)
    torch.testing.assert_close(MulticlassHinge(margin)(lowered, y), expected)


def test_kr_formula_and_empty_groups() -> None:
    f = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0], [0.0, 2.0, 4.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])  # class 2 is absent: only its negative group counts
    per_class = [
        (1.0 + 3.0) / 2 - 0.0,
        2.0 - (-2.0 + 0.0) / 2,
        0.0 - (0.5 - 1.0 + 4.0) / 3,
    ]
    torch.testing.assert_close(KR()(f, y), torch.tensor(-sum(per_class) / 3, dtype=torch.float64))
    single = torch.zeros(3, dtype=torch.long)  # one class only: the other classes have no positives
    expected = -((f[:, 0].mean() - 0) + (0 - f[:, 1].mean()) + (0 - f[:, 2].mean())) / 3
    torch.testing.assert_close(KR()(f, single), expected)


@FAST
@given(seed=st.integers(0, 10_000), alpha_prime=st.floats(0.0, 1000.0), margin=st.floats(0.0, 2.0))
def test_hkr_endpoints_and_deel_lip_alpha_mapping(seed: int, alpha_prime: float, margin: float) -> None:
    f, y = _problem(seed, 32, 5)
    hinge, kr = MulticlassHinge(margin)(f, y), KR()(f, y)
    assert torch.equal(HKR(1.0, margin)(f, y), hinge)
    assert torch.equal(HKR(0.0, margin)(f, y), kr)
    # deel-lip 1.2.0 (TensorFlow) minimises alpha' * hinge - KR_estimate = alpha' * hinge + KR loss.
    rescaled = (1 + alpha_prime) * HKR(alpha_prime / (1 + alpha_prime), margin)(f, y)
    torch.testing.assert_close(rescaled, alpha_prime * hinge + kr, rtol=1e-10, atol=1e-10)


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FACTORY_KWARGS))
@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), "shape"),
        (torch.randn(4, 1), torch.zeros(4, dtype=torch.long), "C >= 2"),
        (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), "N >= 1"),
        (torch.ones(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), "floating point"),
        (torch.tensor([[0.0, math.nan, 0.0, 0.0]]), torch.zeros(1, dtype=torch.long), "NaN or Inf"),
        (torch.tensor([[0.0, math.inf, 0.0, 0.0]]), torch.zeros(1, dtype=torch.long), "NaN or Inf"),
        (torch.randn(3, 4), torch.zeros(2, dtype=torch.long), "shape"),
        (torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.long), "shape"),
        (torch.randn(3, 4), torch.zeros(3, dtype=torch.bool), "integer"),
        (torch.randn(3, 4), torch.tensor([0, 4, 1]), "out of range"),
        (torch.randn(3, 4), torch.tensor([0, -1, 1]), "out of range"),
        (torch.randn(3, 4), torch.zeros(3, dtype=torch.long, device="meta"), "device|meta"),
    ],
)
def test_bad_inputs_raise(name: str, logits: torch.Tensor, labels: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create(name, **FACTORY_KWARGS[name])(logits, labels)


@pytest.mark.parametrize("name", [n for n in FACTORY_KWARGS if n != "tau_bce"])
def test_float_labels_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="integer class indices"):
        create(name, **FACTORY_KWARGS[name])(torch.randn(3, 4), torch.zeros(3))


def test_tau_bce_target_checks() -> None:
    loss_fn = TauBCE(2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        loss_fn(torch.randn(2, 3), torch.tensor([[0.0, 1.5, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="logits' shape"):
        loss_fn(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="out of range"):
        loss_fn(torch.randn(2, 3), torch.tensor([0, 3]))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: TauCrossEntropy(0.0), "tau must be > 0"),
        (lambda: TauCrossEntropy(-1.0), "tau must be > 0"),
        (lambda: TauCrossEntropy(math.inf), "finite"),
        (lambda: TauCrossEntropy(math.nan), "finite"),
        (lambda: TauCrossEntropy(True), "real number"),
        (lambda: TauCrossEntropy("2"), "real number"),
        (lambda: TauCrossEntropy(1.0, offset=-0.1), "offset must be >= 0"),
        (lambda: TauBCE(0.0), "tau must be > 0"),
        (lambda: TauBCE(1.0, pos_weight=0.0), "pos_weight must be > 0"),
        (lambda: MulticlassHinge(-0.1), "margin must be >= 0"),
        (lambda: HKR(-0.1, 0.2), r"alpha must be in \[0, 1\]"),
        (lambda: HKR(1.5, 0.2), "alpha' / \\(1 \\+ alpha'\\)"),
        (lambda: HKR(0.5, -1.0), "margin must be >= 0"),
        (lambda: Focal(-1.0), "gamma must be >= 0"),
        (lambda: Focal(2.0, alpha=[1.0, -1.0]), "finite and >= 0"),
        (lambda: Focal(2.0, alpha=[[1.0, 1.0]]), "1-D"),
        (lambda: Focal(2.0, alpha="ab"), "class weights"),
        (lambda: Focal(2.0, tau=0.0), "tau must be > 0"),
        (lambda: Poly1(-1.5), "below -1/1"),
        (lambda: Poly1(1.0, tau=-2.0), "tau must be > 0"),
        (lambda: Poly1(1.0, gamma=-2.0), "gamma must be >= 0"),
        (lambda: PolyN([0.0, -0.6]), "below -1/2"),
        (lambda: PolyN([]), "non-empty"),
        (lambda: PolyN(1.0), "non-empty"),
        (lambda: KR(validate="yes"), "validate"),
    ],
)
def test_bad_hyper_parameters_raise(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_focal_weights_must_match_the_class_count() -> None:
    with pytest.raises(ValueError, match="3 weights but the logits have 4 classes"):
        Focal(2.0, alpha=[1.0, 1.0, 1.0])(torch.randn(2, 4), torch.tensor([0, 1]))


def test_validate_flag() -> None:
    bad = torch.tensor([[0.0, math.nan], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert torch.isnan(TauCrossEntropy(1.0, validate=False)(bad, labels))
    with pytest.raises(ValueError, match="NaN"):
        TauCrossEntropy(1.0, validate=True)(bad, labels)


@pytest.mark.parametrize("name", list(FACTORY_KWARGS))
def test_default_validation_never_reads_device_values(name: str) -> None:
    """On a non-CPU device the default reads no values, so a GPU step never waits for the device.

    Meta tensors have no values: any host read (`.item()`, `bool()`) raises, so a forward pass that
    succeeds on them proves there is no synchronisation; `validate=True` does read them.
    """
    f, y = torch.randn(4, 4, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    out = create(name, **FACTORY_KWARGS[name])(f, y)
    assert out.device.type == "meta" and out.shape == ()
    with pytest.raises(RuntimeError):
        create(name, **FACTORY_KWARGS[name], validate=True)(f, y)


# --- factory ---------------------------------------------------------------------------------------------


def test_list_losses() -> None:
    assert list_losses() == ["tau_ce", "hinge", "kr", "hkr", "tau_bce", "focal", "poly1", "polyn"]


@pytest.mark.parametrize("name", list(FACTORY_KWARGS))
def test_create_builds_each_loss_with_its_documented_arguments(name: str) -> None:
    loss_fn = create(name, **FACTORY_KWARGS[name])
    for key, value in FACTORY_KWARGS[name].items():
        stored = getattr(loss_fn, key)
        if isinstance(stored, torch.Tensor):
            assert stored.tolist() == value
        elif isinstance(value, list):
            assert list(stored) == value
        else:
            assert stored == value
    f, y = _problem(0, 8, 4)
    assert torch.isfinite(loss_fn(f, y))


def test_create_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss 'ce'.*tau_ce"):
        create("ce", tau=1.0)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['temperature'\]"):
        create("tau_ce", temperature=1.0)
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['alpha', 'margin'\]"):
        create("hkr")
    with pytest.raises(ValueError, match="alpha must be in"):
        create("hkr", alpha=10.0, margin=0.2)


# ---------------------------------------------------------------------------------------------
# sweepable parameters declared by the losses


@pytest.mark.parametrize("name", list(FACTORY_KWARGS))
def test_a_declared_parameter_admits_exactly_what_its_constructor_accepts(name: str) -> None:
    """The sweep and the config refuse a value by the declaration, before any data is loaded; the
    constructor refuses it when the loss is built. Both must draw the line at the same place."""
    params = inspect.signature(loss_class(name).__init__).parameters
    grid = [-2.0, -1.0, -0.999, -0.5, 0.0, 1e-9, 0.5, 1.0, 1.000001, 2.0, 1e300, math.inf, math.nan]
    for param in loss_class(name).sweepable:
        assert param.name in params, (name, param.name)
        for value in grid:
            try:
                create(name, **{**FACTORY_KWARGS[name], param.name: value})
                built = True
            except ValueError:
                built = False
            assert built == (math.isfinite(value) and param.admits(value)), (name, param.name, value)
            if not built:
                with pytest.raises(ValueError, match=f"loss.{param.name} must"):
                    param.check(value, f"loss.{param.name}")


def test_one_declaration_per_parameter_name() -> None:
    seen: dict[str, object] = {}
    for name in list_losses():
        for param in loss_class(name).sweepable:
            assert seen.setdefault(param.name, param) == param, param.name
    assert set(declared_parameters()) == set(seen)
    assert {"tau", "margin", "alpha", "gamma", "epsilon"} <= set(seen)


def test_sweepable_and_parameter_rules() -> None:
    assert list(sweepable("tau_ce")) == ["tau", "offset"]
    assert list(sweepable("hkr")) == ["alpha", "margin"]
    assert "gamma" in sweepable("focal") and "epsilon" in sweepable("poly1")
    assert "alpha" not in sweepable("focal")  # class weights: a vector, not a value to sweep
    with pytest.raises(ValueError, match="unknown loss"):
        sweepable("no_such_loss")
    assert parameter_rule("focal", "gamma") is sweepable("focal")["gamma"]
    assert parameter_rule("focal", "alpha") is None  # taken but not declared: the constructor judges it
    # not an argument of tau_ce: judged by the declaration of the losses that take it (hinge, HKR)
    assert parameter_rule("tau_ce", "margin") is sweepable("hinge")["margin"]
    assert parameter_rule("tau_ce", "no_such_argument") is None
    with pytest.raises(ValueError, match=r"loss.tau must be > 0 \(it multiplies the logits\), got 0"):
        sweepable("tau_ce")["tau"].check(0, "loss.tau")
    with pytest.raises(ValueError, match=r"loss.alpha must lie in \[0, 1\], got 1.5"):
        sweepable("hkr")["alpha"].check(1.5, "loss.alpha")
    with pytest.raises(ValueError, match="loss.epsilon must be >= -1"):
        sweepable("poly1")["epsilon"].check(-1.5, "loss.epsilon")
    with pytest.raises(ValueError, match="must be a number"):
        sweepable("poly1")["epsilon"].check(True, "loss.epsilon")


def test_check_arguments_builds_nothing_and_says_what_create_says() -> None:
    check_arguments("hkr", {"alpha": 10.0, "margin": 0.2})  # a bad value is the constructor's to judge
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['temperature'\]"):
        check_arguments("tau_ce", {"tau": 1.0, "temperature": 1.0})
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['alpha', 'margin'\]"):
        check_arguments("hkr", {})


# ---------------------------------------------------------------------------------------------
# label smoothing of tau-CE


@pytest.mark.parametrize(("tau", "offset", "smoothing"), [(1.0, 0.0, 0.1), (0.5, 0.3, 0.2), (20.0, 0.1, 1.0)])
def test_label_smoothing_is_torchs_on_the_scaled_offset_logits(
    tau: float, offset: float, smoothing: float
) -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 7, dtype=torch.float64)
    target = torch.randint(0, 7, (16,))
    shifted = logits + offset * (1.0 - F.one_hot(target, 7).double())
    expected = F.cross_entropy(tau * shifted, target, label_smoothing=smoothing) / tau
    got = TauCrossEntropy(tau, offset=offset, label_smoothing=smoothing)(logits, target)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    plain = TauCrossEntropy(tau, offset=offset)(logits, target)
    assert torch.equal(TauCrossEntropy(tau, offset=offset, label_smoothing=0.0)(logits, target), plain)


def test_label_smoothing_caps_the_margin_the_loss_asks_for() -> None:
    """The minimiser over the logits has tau (f_y - f_j) = log(1 + C (1 - s) / s) for every j != y: the
    gradient vanishes there, and points towards it from either side."""
    c, tau, s = 10, 0.5, 0.1
    gap = math.log(1 + c * (1 - s) / s) / tau
    target = torch.tensor([3])
    loss = TauCrossEntropy(tau, label_smoothing=s)
    for lead, sign in ((gap, 0), (0.5 * gap, -1), (1.5 * gap, 1)):
        logits = torch.zeros(1, c, dtype=torch.float64)
        logits[0, 3] = lead
        logits.requires_grad_(True)
        loss(logits, target).backward()
        grad = logits.grad[0, 3].item()
        if sign == 0:
            assert abs(grad) < 1e-12
        else:  # below the cap the loss pulls the target logit up, above it pushes it down
            assert grad * sign > 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf])
def test_label_smoothing_outside_0_1_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        TauCrossEntropy(1.0, label_smoothing=bad)
