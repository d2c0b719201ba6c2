"""Losses of the attention catalogue: hand-computed values, limits, gradients and input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lipnet.losses import (
    AttentionVariance,
    Consistency,
    DynamicWeightAverage,
    MILInstance,
    OAAHybrid,
    RankLoss,
    TaskPartition,
    TauBCE,
    TauCrossEntropy,
    WeightedFocal,
)

D = torch.float64


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- weighted focal ----------------------------------------------------------------------------------


def test_weighted_focal_hand_computed() -> None:
    f = torch.tensor([[0.5, -1.0]], dtype=D)
    t = torch.tensor([[1.0, 0.0]], dtype=D)
    priors, gamma, tau = [0.1, 0.4], 2.0, 2.0
    s0, s1 = _sig(tau * 0.5), _sig(tau * -1.0)
    e0 = math.exp(-0.1) * (1 - s0) ** gamma * -math.log(s0)
    e1 = math.exp(-0.4) * s1**gamma * -math.log(1 - s1)
    expected = (e0 + e1) / 2 / tau
    out = WeightedFocal(priors, gamma=gamma, tau=tau)(f, t)
    assert out.item() == pytest.approx(expected, rel=1e-12)


def test_weighted_focal_reduces_to_tau_bce() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 4, generator=g, dtype=D)
    t = (torch.rand(6, 4, generator=g) < 0.3).to(D)
    torch.testing.assert_close(WeightedFocal([0.0] * 4, gamma=0.0, tau=3.0)(f, t), TauBCE(3.0)(f, t))


def test_weighted_focal_large_tau_is_weighted_hinge_and_rare_attributes_weigh_more() -> None:
    f = torch.tensor([[0.3, -0.2], [-0.4, 0.1]], dtype=D)
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=D)
    w = torch.exp(-torch.tensor([0.02, 0.5], dtype=D))
    hinge = (w * F.relu(-(2 * t - 1) * f)).mean()
    out = WeightedFocal([0.02, 0.5], gamma=0.0, tau=1e4)(f, t)
    assert out.item() == pytest.approx(hinge.item(), rel=1e-3)
    rare = WeightedFocal([0.02, 0.5], gamma=2.0)(torch.zeros(1, 2, dtype=D), torch.ones(1, 2, dtype=D))
    common = WeightedFocal([0.5, 0.5], gamma=2.0)(torch.zeros(1, 2, dtype=D), torch.ones(1, 2, dtype=D))
    assert rare > common


def test_weighted_focal_is_finite_for_huge_logits_and_grad_matches_finite_differences() -> None:
    loss = WeightedFocal([0.1, 0.3, 0.02], gamma=2.0, tau=5.0)
    f = torch.tensor([[1e4, -1e4, 0.0]], dtype=D, requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 1.0]], dtype=D)
    out = loss(f, t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(f.grad).all()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, generator=g, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: loss(z, t.expand(3, 3)), (x,))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros(2, 3), torch.zeros(2, 3)), "priors were given"),
        ((torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)), "multi-hot"),
        ((torch.zeros(2, 2), torch.full((2, 2), 1.5)), r"\[0, 1\]"),
        ((torch.tensor([[math.nan, 0.0]]), torch.zeros(1, 2)), "NaN or Inf"),
        ((torch.zeros(2), torch.zeros(2)), "shape"),
    ],
)
def test_weighted_focal_bad_inputs(args: tuple[torch.Tensor, torch.Tensor], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WeightedFocal([0.1, 0.2])(*args)


def test_weighted_focal_bad_priors() -> None:
    with pytest.raises(ValueError, match="priors"):
        WeightedFocal([0.1, 1.5])
    with pytest.raises(ValueError, match="gamma"):
        WeightedFocal([0.1], gamma=-1.0)


# --- attention variance ------------------------------------------------------------------------------


def test_attention_variance_weights_by_the_deviation_of_past_predictions() -> None:
    tau = 1.0
    loss = AttentionVariance([0.0, 0.0], num_samples=3, window=3, strength=1.0, gamma=0.0, tau=tau)
    t = torch.tensor([[1.0, 0.0]], dtype=D)
    idx = torch.tensor([1])
    base = WeightedFocal([0.0, 0.0], gamma=0.0, tau=tau)
    first = torch.tensor([[0.0, 0.0]], dtype=D)
    # Never seen: plain weighted focal.
    assert loss(first, t, idx).item() == pytest.approx(base(first, t).item(), rel=1e-12)
    second = torch.tensor([[2.0, 0.0]], dtype=D)
    assert loss(second, t, idx).item() == pytest.approx(base(second, t).item(), rel=1e-12)
    # Two recorded probabilities for attribute 0: sigmoid(0) and sigmoid(2); population sd = half the gap.
    sd0 = abs(_sig(2.0) - 0.5) / 2
    f = torch.tensor([[1.0, -1.0]], dtype=D)
    s0, s1 = _sig(1.0), _sig(-1.0)
    expected = ((1 + sd0) * -math.log(s0) + -math.log(1 - s1)) / 2
    loss.eval()
    assert loss(f, t, idx).item() == pytest.approx(expected, rel=1e-6)
    assert int(loss.seen[1]) == 2 and int(loss.seen[0]) == 0  # eval mode did not record


def test_attention_variance_zero_strength_is_weighted_focal_and_bad_index() -> None:
    loss = AttentionVariance([0.2, 0.1], num_samples=4, strength=0.0)
    f, t = torch.randn(2, 2, dtype=D), torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    for _ in range(3):
        out = loss(f, t, torch.tensor([0, 3]))
    torch.testing.assert_close(out, WeightedFocal([0.2, 0.1])(f, t))
    with pytest.raises(ValueError, match="sample indices"):
        loss(f, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="int64"):
        loss(f, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="window"):
        AttentionVariance([0.1], num_samples=4, window=1)


# --- MIL instance regulariser and consistency -----------------------------------------------------------


def test_mil_instance_hand_computed_and_mask() -> None:
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]], dtype=D)
    a = torch.tensor([[0.25, 0.75, 0.0]], dtype=D)
    mask = torch.tensor([[True, True, False]])
    y = torch.tensor([1])
    tau, lam = 2.0, 2.0
    ce = TauCrossEntropy(tau)
    expected = lam * (0.25 * ce(z[0, :1], y) + 0.75 * ce(z[0, 1:2], y))
    out = MILInstance(tau=tau, lam=lam)(z, a, y, mask)
    assert out.item() == pytest.approx(expected.item(), rel=1e-12)


def test_mil_instance_gradient_reaches_the_attention() -> None:
    z = torch.tensor([[[3.0, 0.0], [0.0, 3.0]]], dtype=D)
    logits = torch.zeros(1, 2, dtype=D, requires_grad=True)
    MILInstance()(z, torch.softmax(logits, dim=1), torch.tensor([0])).backward()
    # Instance 0 agrees with the bag label: the loss falls when attention moves to it.
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]


@pytest.mark.parametrize(
    ("z", "a", "message"),
    [
        (torch.zeros(1, 2, 2), torch.tensor([[0.5, 0.6]]), "sum to 1"),
        (torch.zeros(1, 2, 2), torch.tensor([[1.5, -0.5]]), ">= 0"),
        (torch.zeros(1, 2, 2), torch.tensor([[1.0]]), "shape"),
        (torch.zeros(2, 2), torch.tensor([[1.0]]), "3-D"),
        (torch.zeros(1, 2, 1), torch.tensor([[0.5, 0.5]]), "C >= 2"),
    ],
)
def test_mil_instance_bad_inputs(z: torch.Tensor, a: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MILInstance()(z, a, torch.tensor([0] * z.shape[0]) if z.ndim == 3 else torch.tensor([0]))


def test_mil_instance_rejects_attention_on_padding_and_bad_labels() -> None:
    z = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="padding"):
        MILInstance()(z, torch.tensor([[0.5, 0.5]]), torch.tensor([0]), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="out of range"):
        MILInstance()(z, torch.tensor([[0.5, 0.5]]), torch.tensor([3]))


def test_consistency_value_range_and_detached_reference() -> None:
    f = torch.tensor([[1.0, 0.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[0.0, 1.0]], dtype=D, requires_grad=True)
    tau = 2.0
    p, q = _sig(tau), _sig(-tau)
    out = Consistency(tau)(f, ref)
    assert out.item() == pytest.approx(2 * (p - q) ** 2 / tau, rel=1e-12)
    out.backward()
    assert ref.grad is None and f.grad is not None
    assert Consistency(tau)(f, f).item() == 0.0
    assert Consistency(1e3)(f.detach(), ref.detach()).item() <= 2 / 1e3 + 1e-15
    with pytest.raises(ValueError, match="shape"):
        Consistency()(torch.zeros(2, 3), torch.zeros(2, 2))


# --- Dynamic Weight Average ----------------------------------------------------------------------------


def test_dwa_raw_matches_the_paper_formula() -> None:
    dwa = DynamicWeightAverage(2, temperature=2.0, surrogate="raw")
    assert dwa.weights().tolist() == [1.0, 1.0]
    dwa.record_epoch([1.0, 2.0])
    assert dwa.weights().tolist() == [1.0, 1.0]
    dwa.record_epoch([0.5, 1.8])
    r = torch.tensor([0.5 / 1.0, 1.8 / 2.0], dtype=D)
    torch.testing.assert_close(dwa.weights(), 2 * torch.softmax(r / 2.0, dim=0))
    total = dwa(torch.tensor([1.0, 1.0], dtype=D))
    assert total.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive"):
        dwa.record_epoch([0.0, 1.0])


def test_dwa_shifted_surrogate_handles_negative_and_zero_losses() -> None:
    dwa = DynamicWeightAverage(3, surrogate="shifted", delta=0.1)
    dwa.record_epoch([-0.2, 0.0, 1.0])
    dwa.record_epoch([-0.5, 0.0, 1.0])
    r = dwa.ratios()
    # An HKR-like task dropping from -0.2 to -0.5: (0 + 0.05) / (0.3 + 0.05); a zero or flat task: 1.
    assert r[0] == pytest.approx(0.05 / 0.35)
    assert r[1] == 1.0 and r[2] == pytest.approx(1.0)
    w = dwa.weights()
    assert w.sum().item() == pytest.approx(3.0) and bool((w > 0).all())
    assert w[0] < w[2]
    # Invariant to rescaling a task's loss, like the paper's ratio.
    scaled = DynamicWeightAverage(3, surrogate="shifted", delta=0.1)
    scaled.record_epoch([-2.0, 0.0, 1.0])
    scaled.record_epoch([-5.0, 0.0, 1.0])
    assert scaled.ratios()[0] == pytest.approx(r[0])


def test_dwa_ratio_is_clipped_and_bad_inputs() -> None:
    dwa = DynamicWeightAverage(2, surrogate="raw", clip=2.0)
    dwa.record_epoch([1.0, 1.0])
    dwa.record_epoch([100.0, 0.001])
    assert dwa.ratios() == [2.0, 0.5]
    with pytest.raises(ValueError, match="expected 2"):
        dwa.record_epoch([1.0])
    with pytest.raises(ValueError, match="finite"):
        dwa.record_epoch([1.0, math.inf])
    with pytest.raises(ValueError, match="surrogate"):
        DynamicWeightAverage(2, surrogate="abs")
    with pytest.raises(ValueError, match="shape"):
        dwa(torch.ones(3))


# --- OAA+ hybrid, task partition, rank --------------------------------------------------------------------


def test_oaa_hybrid_hand_computed() -> None:
    p = torch.tensor([[[1.0, -1.0], [0.5, 2.0]]], dtype=D)
    q = torch.tensor([[[0.8, 0.0], [0.0005, 0.4]]], dtype=D)
    tau = 1.0
    enhance = (0.8 * -math.log(_sig(1.0)) + 0.4 * -math.log(_sig(2.0))) / 2
    constraint = (-math.log(1 - _sig(-1.0)) + -math.log(1 - _sig(0.5))) / 2
    out = OAAHybrid(tau=tau)(p, q)
    assert out.item() == pytest.approx(enhance + constraint, rel=1e-12)
    # All-background target: the enhance term is empty and counts 0.
    zero_q = torch.zeros_like(q)
    assert OAAHybrid()(p, zero_q).item() == pytest.approx(F.softplus(p).mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        OAAHybrid()(p, q + 1)
    with pytest.raises(ValueError, match="threshold"):
        OAAHybrid(threshold=1.0)


def test_task_partition_hand_computed_and_gate_checks() -> None:
    ell = torch.tensor([[[[1.0, 3.0]], [[2.0, 4.0]]]], dtype=D)  # (1, 2 tasks, 1, 2)
    fg = torch.tensor([[[0.75, 0.25]]], dtype=D)
    gate = torch.stack([fg, 1 - fg], dim=1)
    expected = (0.75 * 1 + 0.25 * 3) / 1.0 + (0.25 * 2 + 0.75 * 4) / 1.0
    assert TaskPartition()(ell, gate).item() == pytest.approx(expected)
    g = gate.clone().requires_grad_(True)
    TaskPartition()(ell.clone().requires_grad_(True), g).backward()
    assert g.grad is None
    g2 = gate.clone().requires_grad_(True)
    TaskPartition(detach_gate=False)(ell, g2).backward()
    assert g2.grad is not None
    with pytest.raises(ValueError, match="at most 1"):
        TaskPartition()(ell, torch.ones_like(ell))
    with pytest.raises(ValueError, match="4-D"):
        TaskPartition()(ell[0], gate[0])


def test_rank_loss_hand_computed_and_limits() -> None:
    f = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]], [[3.0, 0.0]]], dtype=D)  # 3 scales, 1 sample
    y = torch.tensor([0])
    p = [_sig(2.0), 0.5, _sig(3.0)]
    expected = max(0, p[0] - p[1] + 0.05) + max(0, p[1] - p[2] + 0.05)
    assert RankLoss()(f, y).item() == pytest.approx(expected, rel=1e-12)
    increasing = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[3.0, 0.0]]], dtype=D)
    assert RankLoss(margin=0.0)(increasing, y).item() == 0.0
    x = torch.randn(2, 3, 4, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: RankLoss(margin=0.9, tau=2.0)(z, torch.tensor([0, 1, 3])), (x,))
    with pytest.raises(ValueError, match="S >= 2"):
        RankLoss()(f[:1], y)
    with pytest.raises(ValueError, match="margin"):
        RankLoss(margin=1.0)
