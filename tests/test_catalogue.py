"""``lipnet catalogue``: every task builds and certifies, the quick table end to end, filters, resume."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from certify.attacks import pgd_l2
from certify.bounds import lipschitz_bound
from certify.radius import binary_radius, certified_radius
from lipnet import catalogue
from lipnet.attention import SqueezeExcitation
from lipnet.catalogue import runner
from lipnet.catalogue.networks import image_network
from lipnet.catalogue.report import CatalogueRow, read_rows, write_outputs
from lipnet.catalogue.runner import train_method
from lipnet.catalogue.tasks import TaskData
from lipnet.catalogue.tasks.base import classification_scores
from lipnet.cli import main
from lipnet.data import ImageDataset
from lipnet.data.shapes import load_shapes10

TINY = catalogue.TaskSettings(n_train=48, n_test=24, epochs=1, lr=1e-2, tau=4.0, batch_size=16, width=8)


def _read(out: Path) -> list[dict[str, str]]:
    with open(out / "catalogue.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_quick_catalogue_writes_a_sound_table(lipnet_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat"
    assert main(["catalogue", "--quick", "--quiet", "--out", str(out), "--threads", "1"]) == 0
    rows = _read(out)
    # The baseline and the first attention method of every task.
    expected = {(m, t) for t in catalogue.TASKS for m in catalogue.available_methods(t)[:2]}
    assert {(r["method"], r["task"]) for r in rows} == expected
    for r in rows:
        clean = float(r["clean_accuracy"])
        certs = [float(r[k]) for k in r if k.startswith("certified@")]
        assert len(certs) == 3 and certs == sorted(certs, reverse=True) and certs[0] <= clean
        # Certified accuracy is a lower bound of robust accuracy; PGD gives an upper bound of it.
        assert float(r["robust_accuracy"]) >= certs[0] - 1e-9
        assert 0 < float(r["lipschitz"]) < 10 and float(r["lipschitz_raw"]) > 0
        assert int(r["params"]) > 0 and float(r["train_seconds"]) >= 0
        settings = json.loads(r["settings"])
        assert settings["width"] == catalogue.QUICK[r["task"]].width and settings["seed"] == 0
        if r["method"] == "baseline":
            assert r["delta_metric"] == "+0.0000" and r["params_ratio"] == "1.00"
        else:
            assert r["delta_metric"] and float(r["params_ratio"]) > 0
    by_task = {r["task"]: json.loads(r["details"]) for r in rows if r["method"] != "baseline"}
    assert "F1" in by_task["attributes"] and len(by_task["attributes"]["clean"]) == 6
    assert set(by_task["multitask"]["accuracy"]) == {"class", "colour", "mask_pixel"}
    assert 0 <= by_task["mil"]["instance_AUC"] <= 1
    md = (out / "catalogue.md").read_text()
    assert "lipnet catalogue --quick" in md and "| baseline | attributes | mA |" in md
    assert "## Settings per task" in md
    assert (out / "catalogue.png").is_file() or "matplotlib" not in md


@pytest.mark.parametrize("task", list(catalogue.TASKS))
def test_every_method_of_every_task_builds_and_is_bounded(lipnet_data: Path, task: str) -> None:
    t = catalogue.TASKS[task]
    data = t.load("test", 12, 0)
    shape = data.input_shape
    for method in t.methods():
        torch.manual_seed(0)
        model = t.build(method, TINY, data).eval()
        with torch.no_grad():
            out = model(data.dataset.images[:3])
        assert out.shape[0] == 3 and torch.isfinite(out).all(), method
        lip = lipschitz_bound(model, shape)
        # Normalised modules inside 1-Lipschitz layers: the network's bound is at most ~1.
        assert 0 < lip <= 1.0 + 1e-4, (method, lip)
        assert catalogue.raw_bound(model, shape) > 0
        assert all(m.normalize for m in model.modules() if isinstance(getattr(m, "normalize", None), bool))


@pytest.mark.parametrize("task", list(catalogue.TASKS))
def test_the_difficulty_setting_reaches_every_task_s_images(lipnet_data: Path, task: str) -> None:
    t = catalogue.TASKS[task]
    full, easy = t.load("test", 8, 0), t.load("test", 8, 0, difficulty=0.0)
    assert torch.equal(full.dataset.images, t.load("test", 8, 0, difficulty=1.0).dataset.images)
    # The setting scales the nuisances only: same labels (the same shapes), other pixels.
    assert torch.equal(full.dataset.labels, easy.dataset.labels)
    assert not torch.equal(full.dataset.images, easy.dataset.images)
    if task == "classification":
        assert torch.equal(easy.dataset.images, load_shapes10("test", n=8, seed=0, difficulty=0.0).images)


def test_the_budget_s_warmup_and_difficulty_reach_training_and_data(
    lipnet_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}
    real_fit = runner.fit

    def spy(*args: object, **kwargs: object) -> object:
        seen["warmup"] = kwargs["warmup"]
        return real_fit(*args, **kwargs)  # type: ignore[arg-type]

    real_load = catalogue.TASKS["classification"].load

    def load(split: str, n: int, seed: int, difficulty: float = 1.0) -> TaskData:
        seen[split] = difficulty
        return real_load(split, n, seed, difficulty)

    monkeypatch.setattr(runner, "fit", spy)
    monkeypatch.setattr(catalogue.TASKS["classification"], "load", load)
    budget = {"classification": replace(TINY, warmup=0.25, difficulty=0.5)}
    rows = catalogue.run_catalogue(["baseline"], ["classification"], settings=budget, attack_n=0)
    assert seen == {"warmup": 0.25, "train": 0.5, "test": 0.5}
    recorded = json.loads(rows[0].settings)
    assert recorded["difficulty"] == 0.5 and recorded["warmup"] == 0.25


@pytest.mark.parametrize(
    "bad", [{"warmup": 1.0}, {"warmup": -0.1}, {"difficulty": 1.5}, {"difficulty": True}, {"warmup": "0.1"}]
)
def test_task_settings_refuse_a_bad_warmup_or_difficulty(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        replace(TINY, **bad)  # type: ignore[arg-type]


def _trained(task: str, method: str) -> tuple[nn.Module, TaskData]:
    t = catalogue.TASKS[task]
    train, test = t.load("train", TINY.n_train, 0), t.load("test", TINY.n_test, 0)
    torch.manual_seed(0)
    model = t.build(method, TINY, train)
    train_method(t, method, model, train, replace(TINY, epochs=2), seed=0)
    return model, test


def _attack_inside(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radii: torch.Tensor) -> int:
    """Number of certified samples whose prediction PGD flips inside 0.99 times their radius."""
    certified = radii > 0
    if not bool(certified.any()):
        return 0
    xs, ys, rs = x[certified], y[certified], radii[certified].float() * 0.99
    adv = pgd_l2(model, xs, ys, rs, steps=30, restarts=2, step_size=0.5)
    assert bool(((adv - xs).flatten(1).norm(dim=1) <= rs * (1 + 1e-5)).all())
    with torch.no_grad():
        return int((model(adv).argmax(dim=1) != ys).sum())


@pytest.mark.parametrize(
    ("task", "method"),
    [
        ("classification", "SqueezeExcitation"),
        ("mil", "baseline"),
        ("mil", "LossAttentionMIL"),
        ("cluttered", "SoftGlimpse"),
    ],
)
def test_certificates_survive_an_attack_inside_the_radius(lipnet_data: Path, task: str, method: str) -> None:
    model, test = _trained(task, method)
    ds = test.dataset
    lip = lipschitz_bound(model, ds.input_shape)
    with torch.no_grad():
        logits = model(ds.images)
    radii = certified_radius(logits, ds.labels, lip, input_norms=ds.images.flatten(1).norm(dim=1))
    assert bool((radii > 0).any()), "nothing certified: the test would prove nothing"
    assert _attack_inside(model, ds.images, ds.labels, radii) == 0


class _Pair(nn.Module):
    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model(x)[:, self.index]
        return torch.stack([-f, f], dim=1)


def test_per_attribute_certificates_survive_an_attack(lipnet_data: Path) -> None:
    model, test = _trained("attributes", "MultiScaleAttentionAggregation")
    ds, targets = test.dataset, test.targets[0]
    bounds = catalogue.TASKS["attributes"].attribute_bounds(
        "MultiScaleAttentionAggregation", model, ds.input_shape
    )
    assert bool((bounds <= lipschitz_bound(model, ds.input_shape) * (1 + 1e-9)).all())
    with torch.no_grad():
        logits = model(ds.images)
    radii = binary_radius(logits, targets, bounds, input_norms=ds.images.flatten(1).norm(dim=1))
    assert bool((radii > 0).any())
    for c in range(targets.shape[1]):
        flips = _attack_inside(_Pair(model, c), ds.images, targets[:, c].long(), radii[:, c])
        assert flips == 0, f"attribute {c}"


def test_filters_and_resume(lipnet_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cat"
    args = ["catalogue", "--quick", "--tasks", "mil,scale", "--methods", "baseline", "--out", str(out)]
    assert main([*args, "--threads", "1"]) == 0
    first = _read(out)
    assert {(r["method"], r["task"]) for r in first} == {("baseline", "mil"), ("baseline", "scale")}
    capsys.readouterr()
    # Same settings: nothing is trained again and the rows are kept as they were.
    assert main([*args, "--threads", "1"]) == 0
    assert "already in the output folder" in capsys.readouterr().out
    assert _read(out) == first
    # Different settings for one task: that row is trained again, the other one is kept.
    assert main([*args[:3], "mil", *args[4:], "--tau", "3", "--threads", "1", "--quiet"]) == 0
    again = {r["task"]: r for r in _read(out)}
    assert catalogue.QUICK["mil"].tau != 3.0 and json.loads(again["mil"]["settings"])["tau"] == 3.0
    assert again["scale"] == next(r for r in first if r["task"] == "scale")


@pytest.mark.parametrize(
    "extra",
    [
        ["--methods", "NoSuchAttention"],
        ["--tasks", "nosuchtask"],
        ["--width", "3"],
        ["--lr", "-1"],
        ["--tau", "nan"],
        ["--attack-n", "-2"],
        ["--difficulty", "1.5"],
        ["--difficulty", "nan"],
        ["--warmup", "1"],
        ["--warmup", "-0.1"],
    ],
)
def test_bad_input_exits_2(lipnet_data: Path, tmp_path: Path, extra: list[str]) -> None:
    assert main(["catalogue", "--quick", "--quiet", "--out", str(tmp_path / "x"), *extra]) == 2
    assert not (tmp_path / "x" / "catalogue.csv").exists()


def test_a_corrupted_table_is_not_overwritten(lipnet_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat"
    out.mkdir()
    (out / "catalogue.csv").write_text("not,a\ncatalogue,table\n")
    assert main(["catalogue", "--quick", "--quiet", "--tasks", "mil", "--out", str(out)]) == 2
    assert (out / "catalogue.csv").read_text() == "not,a\ncatalogue,table\n"


def test_raw_bound_switches_normalisation_off_and_restores_it() -> None:
    torch.manual_seed(0)
    module = SqueezeExcitation(4, normalize=True)
    net = image_network(10, 4, middle=module)
    shape = (3, 32, 32)
    normalised = lipschitz_bound(net, shape)
    module.normalize = False
    expected = lipschitz_bound(net, shape)
    module.normalize = True
    assert expected != pytest.approx(normalised, rel=1e-6)
    assert catalogue.raw_bound(net, shape) == pytest.approx(expected, rel=1e-12)
    assert module.normalize is True
    assert lipschitz_bound(net, shape) == pytest.approx(normalised, rel=1e-12)


@pytest.mark.parametrize("seconds", [0.04, 0.06, 12.34])
def test_a_table_read_back_writes_the_same_table(tmp_path: Path, seconds: float) -> None:
    """Resume rewrites the table from the CSV: that must not change a byte (the CI failure of
    2026-11-30: a time ratio from unrounded seconds, 0.04 s / 0.04 s, became 0.0 s / 0.0 s on read-back)."""
    eps = [36 / 255, 72 / 255]
    cert = {"36/255": 0.123456, "72/255": 0.05}
    base = CatalogueRow("baseline", "mil", "bag accuracy", 0.51234, 0.5, cert, 0.25, "pgd-5",
                        0.3225912345678, 0.3225912345678, 100, seconds, "{}", "{}")  # fmt: skip
    other = replace(base, method="SE", metric_value=0.61239, lipschitz=1.0000001234567)
    other = replace(other, train_seconds=2 * seconds)
    write_outputs([base, other], eps, tmp_path, "cmd", plot=False)
    first = (tmp_path / "catalogue.csv").read_bytes(), (tmp_path / "catalogue.md").read_bytes()
    rows = read_rows(tmp_path / "catalogue.csv")
    assert [r.lipschitz for r in rows] == [base.lipschitz, other.lipschitz]
    write_outputs(rows, eps, tmp_path, "cmd", plot=False)
    assert ((tmp_path / "catalogue.csv").read_bytes(), (tmp_path / "catalogue.md").read_bytes()) == first
    # The Markdown table rounds a bound up, never down: 1.0000001234567 prints as 1.00001.
    assert "| 1.00001 |" in first[1].decode()


def test_restart_retrains_the_selected_rows_and_keeps_the_others(lipnet_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat"
    args = ["catalogue", "--quick", "--quiet", "--methods", "baseline", "--out", str(out), "--threads", "1"]
    assert main([*args, "--tasks", "mil,scale"]) == 0
    first = {r["task"]: r for r in _read(out)}
    (out / "catalogue.csv").write_text((out / "catalogue.csv").read_text().replace("pgd-5", "pgd-5*"))
    assert main([*args, "--tasks", "scale", "--restart"]) == 0
    again = {r["task"]: r for r in _read(out)}
    assert set(again) == {"mil", "scale"}
    assert again["mil"]["attack"] == "pgd-5*"  # kept as it was in the table
    assert again["scale"]["attack"] == "pgd-5"
    assert again["scale"]["metric_value"] == first["scale"]["metric_value"]


def test_spatial_and_mil_attention_cost_their_documented_price(lipnet_data: Path) -> None:
    # The configuration that makes these rows learn (docs/catalogue.md): the input-dependent part of
    # each spatial module costs 0.5 whatever the weights, and MIL attention uses beta rho = sqrt 2.
    from lipnet.catalogue.networks import CentredPooling

    cluttered = catalogue.TASKS["cluttered"]
    data = cluttered.load("test", 12, 0)
    price = {"BoundedTranslation": 1.5, "BoundedZoom": 2.0, "SoftGlimpse": 1.5}
    for method, raw in price.items():
        torch.manual_seed(0)
        model = cluttered.build(method, TINY, data)
        module = next(m for m in model.modules() if type(m).__name__ == method)
        module.normalize = False
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(30.0)
        assert module.lipschitz_bound() == pytest.approx(raw, rel=1e-6), method
    mil = catalogue.TASKS["mil"]
    bags = mil.load("test", 12, 0)
    lam = mil.build("LossAttentionMIL", TINY, bags).aggregator
    assert lam.beta * lam.radius == pytest.approx(2**0.5)
    sap = mil.build("SoftAttentionPooling", TINY, bags)
    assert isinstance(sap.aggregator[0], CentredPooling) and sap.aggregator[0].pool.radius == lam.radius
    assert sap.instance_scores(bags.dataset.images[:2]).shape == (2, mil.bag_size)


def test_single_label_tasks_are_certified_by_certify_certify() -> None:
    """The catalogue certifies a class decision with certify.certify, as every command does, so a network
    ending in a dense layer gets the last-layer rule (it used the global rule alone). The head's rows are
    0.5 apart while ||W|| = sqrt(1.25): the margin 0.15 certifies radius 0.15 / 0.5 = 0.3 by the
    last-layer rule (above 36/255 and 72/255, below 108/255), 0.15 / (sqrt 2 sqrt 1.25) = 0.095 by the
    global one (below all three)."""
    head = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    model = nn.Sequential(nn.Flatten(), head).eval()
    images = torch.zeros(8, 1, 2, 2)
    images[:, 0, 0, 0] = 0.3
    ds = ImageDataset(images, torch.zeros(8, dtype=torch.int64), 2, ["a", "b"], "two_rows")
    eps = [36 / 255, 72 / 255, 108 / 255]
    clean, cert, robust, lip = classification_scores(
        model, TaskData(ds), eps, {"name": "pgd", "n": 0, "steps": 1}
    )
    assert clean == 1.0 and robust is None
    assert cert == {"36/255": 1.0, "72/255": 1.0, "108/255": 0.0}
    assert lip == pytest.approx(1.25**0.5, rel=1e-6)  # the table's L: the whole network's bound
    with torch.no_grad():
        norms = images.flatten(1).norm(dim=1)
        global_radii = certified_radius(model(images), ds.labels, lip, input_norms=norms)
    assert bool((global_radii < eps[0]).all())


def test_a_diverging_row_is_one_line_and_exit_1(
    lipnet_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A loss that becomes NaN is training divergence, as in lipnet train (it ended in a traceback)."""

    def nan_loss(method: str, model: nn.Module, batch: tuple[torch.Tensor, ...], state: dict) -> torch.Tensor:
        return model(batch[0]).sum() * float("nan")

    monkeypatch.setattr(catalogue.TASKS["mil"], "loss", nan_loss)
    out = tmp_path / "cat"
    args = ["catalogue", "--quick", "--tasks", "mil", "--methods", "baseline", "--out", str(out), "--quiet"]
    assert main([*args, "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        "lipnet catalogue: error: mil/baseline: the training loss became nan at step 1 (epoch 1): "
        "lower --lr\n"
    )
    assert not (out / "catalogue.csv").exists()
