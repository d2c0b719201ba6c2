"""Attacks: strong enough to find the decision boundary, and never inside a certified radius."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certify.attacks import (
    autoattack_available,
    autoattack_l2,
    empirical_robust_accuracy,
    flips_within_radius,
    frozen,
    pgd_l2,
    resolve_attack,
)
from certify.bounds import lipschitz_bound
from certify.radius import certified_radius


def _blobs(n: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 0.5 + 0.15 * torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    x = (centres[y] + 0.08 * torch.randn(n, d, generator=g)).clamp(0.0, 1.0)
    return x, y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_pgd_reaches_the_exact_boundary_of_a_linear_model() -> None:
    torch.manual_seed(0)
    x, y = _blobs(300, 20, 5, seed=1)
    model = _train(nn.Sequential(nn.Linear(20, 5)), x, y)
    with torch.no_grad():
        logits = model(x)
    r = certified_radius(logits, y, 1.0, last_layer_weight=model[0].weight, input_norms=x.norm(dim=1)).float()
    ok = r > 0
    assert ok.sum() > 100
    outside = flips_within_radius(model, x[ok], y[ok], r[ok], shrink=1.02, steps=60, restarts=1, targets=4)
    inside = flips_within_radius(model, x[ok], y[ok], r[ok], shrink=0.999, steps=60, restarts=1, targets=4)
    # The attack finds the boundary just beyond the exact radius for nearly all samples (the pixel
    # box can stop a few), and never crosses it inside.
    assert outside.double().mean() > 0.95
    assert not inside.any()


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_no_flip_inside_certified_radii_of_trained_mlps(act: type[nn.Module]) -> None:
    torch.manual_seed(0)
    x, y = _blobs(400, 3 * 4 * 4, 10, seed=2)
    x = x.view(-1, 3, 4, 4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 10))
    _train(model, x, y)
    with torch.no_grad():
        logits = model(x)
    lip = lipschitz_bound(model[:-1], (3, 4, 4))
    norms = x.flatten(1).norm(dim=1)
    radii = certified_radius(logits, y, lip, last_layer_weight=model[-1].weight, input_norms=norms)
    assert (radii > 0).sum() > 50
    flips = flips_within_radius(model, x, y, radii.float(), steps=40, restarts=1)
    assert not flips.any()


def test_pgd_respects_radius_and_box() -> None:
    torch.manual_seed(0)
    x, y = _blobs(50, 10, 3, seed=3)
    model = _train(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)), x, y, steps=50)
    eps = torch.linspace(0.01, 0.5, 50)
    adv = pgd_l2(model, x, y, eps, steps=20, restarts=2)
    assert torch.all((adv - x).norm(dim=1) <= eps * (1 + 1e-6))
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("attack", ["pgd", "autoattack"])
def test_empirical_robust_accuracy_is_monotone(attack: str) -> None:
    if attack == "autoattack" and not autoattack_available():
        pytest.skip("pyautoattack (the 'attack' extra) is not installed")
    torch.manual_seed(0)
    x, y = _blobs(60, 10, 5, seed=4)
    model = _train(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5)), x, y, steps=100)
    accs = [empirical_robust_accuracy(model, x, y, e, attack=attack) for e in (0.0, 0.05, 2.0)]
    clean = float((model(x).argmax(1) == y).double().mean())
    assert accs[0] == pytest.approx(clean)
    assert accs[0] >= accs[1] >= accs[2]
    assert accs[2] < 0.2


class _Counting(nn.Module):
    """Counts the samples the wrapped model is evaluated on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += x.shape[0]
        return self.inner(x)


def test_pgd_stops_attacking_a_sample_once_it_flips() -> None:
    torch.manual_seed(0)
    x, y = _blobs(40, 10, 3, seed=5)
    model = _Counting(_train(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)), x, y, steps=80))
    with torch.no_grad():
        wrong = model(x).argmax(dim=1) != y
    model.samples = 0
    adv = pgd_l2(model, x, y, 3.0, steps=30, restarts=2)
    with torch.no_grad():
        flipped = model.inner(adv).argmax(dim=1) != y
    # A ball of radius 3 holds the whole [0, 1]^10 box: every sample flips, most within a few steps,
    # so far fewer than the full (1 + 2 * 31) * 40 evaluations are spent.
    assert flipped.all()
    assert model.samples < 0.25 * (1 + 2 * 31) * len(y)
    # Already misclassified samples are returned unchanged, never attacked.
    assert torch.equal(adv[wrong], x[wrong])


# --- frozen parameters, the cached orthogonalisation, and the one rule for "auto" -------------------


def _bjorck_mlp() -> nn.Module:
    """A 3-layer Björck MLP in training mode with trainable parameters, as it leaves a training loop."""
    from lipnet.activations import GroupSort
    from lipnet.layers import BjorckLinear

    torch.manual_seed(0)
    layers = [BjorckLinear(10, 16), GroupSort(2), BjorckLinear(16, 16), GroupSort(2), BjorckLinear(16, 5)]
    return nn.Sequential(*layers)


def _count_orthogonalisations(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    from lipnet.layers.bjorck import BjorckOrthonormal

    calls = {"n": 0}
    compute = BjorckOrthonormal.compute

    def counted(self: BjorckOrthonormal, original: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return compute(self, original)

    monkeypatch.setattr(BjorckOrthonormal, "compute", counted)
    return calls


def _clear_caches(model: nn.Module) -> None:
    from lipnet.layers import CachedParametrization

    for m in model.modules():
        if isinstance(m, CachedParametrization):
            m.clear_cache()


@pytest.mark.parametrize("attack", ["pgd", "flips", "empirical-pgd", "autoattack"])
def test_attacks_orthogonalise_once_per_attack_not_per_step(
    attack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attack freezes the parameters, so a cached parametrization computes its weight once per layer
    for the whole attack (the attacks used to recompute it at every forward pass: 3 layers x 21+ passes)."""
    if attack == "autoattack" and not autoattack_available():
        pytest.skip("pyautoattack (the 'attack' extra) is not installed")
    model = _bjorck_mlp()
    x, y = _blobs(24, 10, 5, seed=6)
    calls = _count_orthogonalisations(monkeypatch)
    _clear_caches(model)
    if attack == "pgd":
        pgd_l2(model, x, y, 0.3, steps=20)
    elif attack == "flips":
        flips_within_radius(model, x, y, torch.full((24,), 0.05), steps=10, restarts=1, targets=2)
    elif attack == "empirical-pgd":
        empirical_robust_accuracy(model, x, y, 0.3, attack="pgd", steps=20)
    else:
        autoattack_l2(model, x, y, 0.3, attacks=("apgd-ce",))
    assert calls["n"] == 3
    # the model leaves as it came: training mode, trainable parameters
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


class _FailsOnThirdCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(10, 8), nn.Dropout(0.1), nn.Linear(8, 3))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return self.inner(x)


def test_frozen_restores_modes_and_flags_after_an_exception() -> None:
    model = _FailsOnThirdCall()
    model.inner[0].weight.requires_grad_(False)  # a mix of frozen and trainable parameters is kept
    model.inner[1].eval()  # and a mix of modes
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    x, y = _blobs(6, 10, 3, seed=7)
    with pytest.raises(RuntimeError, match="boom"):
        pgd_l2(model, x, y, 0.5, steps=5)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(ValueError, match="inside"), frozen(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        raise ValueError("inside")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes


def test_autoattack_runs_the_standard_single_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """APGD-CE runs 1 restart of 100 iterations, as standard AutoAttack does (pyautoattack's 'custom'
    version kept the constructor's 5 restarts: five times the model evaluations on a robust sample)."""
    if not autoattack_available():
        pytest.skip("pyautoattack (the 'attack' extra) is not installed")
    x, y = _blobs(8, 10, 3, seed=8)
    model = _Counting(_train(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)), x, y, steps=80))
    with torch.no_grad():
        right = model.inner(x).argmax(dim=1) == y
    model.samples = 0
    autoattack_l2(model, x[right], y[right], 1e-4, attacks=("apgd-ce",))  # too small a radius to flip any
    # 1 restart: about 100 iterations (plus a few checks) per sample; 5 restarts would be about 500
    assert 100 * int(right.sum()) <= model.samples < 150 * int(right.sum())


def test_resolve_attack_is_the_one_rule_for_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    import certify.attacks as attacks

    cpu = resolve_attack("auto", "cpu")
    assert cpu.name == "pgd" and "auto on cpu" in cpu.reason and str(cpu).startswith("L2 PGD (")
    assert resolve_attack("pgd", "cuda").name == "pgd"
    monkeypatch.setattr(attacks, "autoattack_available", lambda: True)
    assert resolve_attack("auto", torch.device("cuda", 0)).name == "autoattack"
    assert resolve_attack("autoattack", "cpu") == attacks.AttackChoice("autoattack", "asked for")
    monkeypatch.setattr(attacks, "autoattack_available", lambda: False)
    missing = resolve_attack("auto", "cuda")
    assert missing.name == "pgd" and "not installed" in missing.reason
    with pytest.raises(ImportError, match="'attack' extra"):
        resolve_attack("autoattack", "cuda")
    with pytest.raises(ValueError, match="unknown attack"):
        resolve_attack("fgsm", "cpu")


def test_audit_auto_on_cpu_runs_pgd_and_says_so() -> None:
    from certify.audit import audit

    x, y = _blobs(40, 10, 3, seed=9)
    model = _train(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)), x, y, steps=50)
    report = audit(model, [(x, y)], eps=[0.05], n_attack=8, pgd_steps=5, progress=False)  # attack="auto"
    assert report.attack == "pgd"
    assert any(n.startswith("attack: L2 PGD (--attack auto on cpu") for n in report.notes)
