"""``lipnet bench fmnist`` and the Fashion-MNIST models: end to end on IDX fixtures, and on the real data."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixtures import write_idx
from torch import nn

from lipnet.activations import GroupSort, HouseholderActivation
from lipnet.bench.fmnist import (
    EPS,
    Contender,
    _at_tau,
    _network_of,
    _select,
    _Trainee,
    bench_fmnist,
    contenders,
    layout_of,
    network_fingerprint,
    time_steps,
    zero_biases,
)
from lipnet.cli import main
from lipnet.cli.argtypes import positive_float_list
from lipnet.data.dataset import ImageDataset
from lipnet.layers.batching import WeightBatcher
from lipnet.layers.bjorck import BjorckLinear
from lipnet.layers.kinds import AUTO_TAU_SPLIT, LayerKind, get_layer_kind, list_layer_kinds
from lipnet.layers.rownorm import RowNormLinear
from lipnet.models import create
from lipnet.models.fmnist import AUTO_TAUS, ROWNORM_TAU, fmnist_layers
from lipnet.pooling import ScaledL2NormPool2d
from lipnet.training.config import apply_overrides, load_config
from lipnet.training.loop import fit, lr_at

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _stripes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class c is a bright band on rows 2c+4 .. 2c+5, over uniform noise in [0, 0.3]."""
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.uniform(0, 0.3, (n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 * c + 4 : 2 * c + 6, :] = 1.0
    return (images * 255).round().astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="module")
def stripes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable Fashion-MNIST stand-in in the real IDX format (400 train / 64 test images)."""
    folder = tmp_path_factory.mktemp("fmnist-idx") / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 400), ("t10k", 64)):
        images, labels = _stripes(n, rng)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, gz=True)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, gz=True)
    return folder.parent


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _bench(out: Path, data_dir: Path, *extra: str) -> int:
    return main([
        "bench", "fmnist", "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu", "--quiet",
        "--epochs", "1", "--batch-size", "32", "--tau", "10",
        *extra,
    ])  # fmt: skip


def test_registered_models_are_1_lipschitz_for_every_kind() -> None:
    torch.manual_seed(0)
    for kind in list_layer_kinds():
        model = create("fmnist_convnet_s", conv=kind).eval()
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
        assert model.lipschitz_bound((1, 28, 28)) <= 1 + 1e-4, kind
    medium = create("fmnist_convnet_m", conv="aol")
    assert len(medium) == len(create("fmnist_convnet_s")) + 4  # one more block (+ activation) per stage
    assert isinstance(medium[-1], torch.nn.Linear) and medium[-1].in_features == 256


def test_contenders_share_one_architecture() -> None:
    """Every library's network: the registered lipnet kinds, same children count and the same shapes."""
    pytest.importorskip("orthogonium")
    found = contenders("s")
    lipnet = [c.kind for c in found if c.library == "lipnet"]
    # auto: the network per tau; bcop+householder, rko_bcop+rownorm: those it trains beside the kinds
    assert sorted(lipnet) == sorted([*list_layer_kinds(), "bcop+householder", "rko_bcop+rownorm", "auto"])
    assert {c.name for c in found} >= {
        "deel-torchlip:spectral", "orthogonium:aoc", "orthogonium:aol", "orthogonium:sll",
    }  # fmt: skip
    x = torch.rand(2, 1, 28, 28)

    def shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
        out, h = [], x
        with torch.no_grad():
            for child in model.children():
                h = child(h)
                out.append(tuple(h.shape))
        return out

    reference = shapes(create("fmnist_convnet_s", conv="aol").eval())
    for c in found:
        assert shapes(c.build().eval()) == reference, c.name


def test_bench_end_to_end(stripes_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("orthogonium")
    models = "lipnet:aol,deel-torchlip:spectral,orthogonium:aoc"
    code = _bench(
        tmp_path,
        stripes_dir,
        "--models",
        models,
        "--attack",
        "pgd",
        "--attack-n",
        "64",
        "--attack-steps",
        "5",
        "--lr",
        "1e-2",
    )
    assert code == 0
    rows = _read(tmp_path / "fmnist.csv")
    assert [f"{r['library']}:{r['kind']}" for r in rows] == models.split(",")
    for r in rows:
        clean = float(r["clean"])
        cert = [float(r[f"cert_{e:g}"]) for e in EPS]
        robust = [float(r[f"robust_{e:g}"]) for e in EPS]
        # The attack ran on the same 64 images that were certified: certified <= robust <= clean.
        assert all(a >= b for a, b in zip(cert, cert[1:], strict=False)), r
        assert all(c - 1e-9 <= e <= clean + 1e-9 for c, e in zip(cert, robust, strict=True)), r
        assert float(r["epochs"]) == 1 and float(r["sec_per_epoch"]) > 0
        assert 0 < float(r["bound"]) <= 1 + 1e-4 and r["attack"] == "pgd (5 steps) on 64"
        assert int(r["params"]) > 0 and 0 <= float(r["mean_radius"]) < 10
    # The stripes are learnable (chance is 0.1): the loop trains, and the certificates are not vacuous.
    best = max(rows, key=lambda r: float(r["clean"]))
    assert float(best["clean"]) > 0.5 and float(best["cert_0.1"]) > 0.2
    md = (tmp_path / "fmnist.md").read_text(encoding="utf-8")
    assert "L2 PGD (5 steps)" in md and "| lipnet | aol |" in md and "| orthogonium | aoc |" in md


def test_time_cap_stops_training_and_bad_names_are_refused(
    stripes_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _bench(tmp_path, stripes_dir, "--models", "lipnet:aol", "--time-cap", "1e-9", "--attack-n", "0")
    assert code == 0
    (row,) = _read(tmp_path / "fmnist.csv")
    assert float(row["epochs"]) == pytest.approx(1 / 13, abs=1e-4)  # one step of the 13 per epoch (400 / 32)
    assert row["robust_0.1"] == "" and row["attack"] == "none"
    capsys.readouterr()
    assert _bench(tmp_path / "bad", stripes_dir, "--models", "lipnet:nope") == 2
    err = capsys.readouterr().err
    assert "unknown model(s) lipnet:nope" in err and "deel-torchlip:spectral" in err


@pytest.mark.realdata
def test_bench_on_the_debian_fashion_mnist(tmp_path: Path) -> None:
    if not (DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{DEBIAN_FASHION} is absent: apt-get install dataset-fashion-mnist to run this test")
    code = _bench(
        tmp_path, tmp_path / "empty", "--models", "lipnet:bjorck,deel-torchlip:spectral", "--n-train", "640",
        "--n-test", "200", "--attack-n", "0",
    )  # fmt: skip
    assert code == 0
    rows = _read(tmp_path / "fmnist.csv")
    assert float(rows[1]["clean"]) > 0.5 and float(rows[1]["cert_0.1"]) > 0.3
    assert float(rows[0]["clean"]) > 0.15  # chance is 0.1


REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "experiments" / "configs" / "fmnist_convnet_s.yaml"


def test_positive_float_list_parses_temperatures() -> None:
    assert positive_float_list("0.5, 5,50") == [0.5, 5.0, 50.0]  # bad values: tests/test_cli_errors.py


def test_every_contender_starts_from_zero_biases_and_its_own_weights() -> None:
    """Zero biases are part of the recipe: orthogonium's layers draw them uniformly, the bench zeroes them
    (and only them), lipnet's and deel-torchlip's are built so."""
    pytest.importorskip("orthogonium")
    recipe = load_config(DEFAULT_RECIPE, ["device=cpu"])
    size, layout, options = layout_of(recipe)
    found = _select(
        contenders(size, layout=layout, lipnet_options=options),
        ["lipnet:bjorck", "deel-torchlip:spectral", "orthogonium:aoc"],
    )
    for c in found:
        torch.manual_seed(recipe.seed)
        shipped = dict(c.build().named_parameters())
        trained = dict(_Trainee(c, recipe, torch.device("cpu")).model.named_parameters())
        biases = [n for n in shipped if n.rsplit(".", 1)[-1] == "bias"]
        assert len(biases) == 4, c.name  # two convolutions, two dense layers
        for name, p in trained.items():
            if name in biases:
                assert not p.any(), (c.name, name)
            else:
                assert torch.equal(p, shipped[name]), (c.name, name)
    torch.manual_seed(0)
    orthogonium = found[2].build()
    assert any(p.abs().max() > 0.1 for n, p in orthogonium.named_parameters() if n.endswith("bias"))
    assert zero_biases(orthogonium) == 4
    assert all(not p.any() for n, p in orthogonium.named_parameters() if n.endswith("bias"))


def test_step_timing_follows_the_recipes_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timed steps are the first steps of the real run (warm-up included), not a constant learning
    rate: Adam at a constant 8e-3 without warm-up, repeated on a few batches, drove a contender to NaN."""
    recipe = load_config(DEFAULT_RECIPE, ["device=cpu", "optim.epochs=4"])
    size, layout, options = layout_of(recipe)
    chosen = _select(contenders(size, layout=layout, lipnet_options=options), ["lipnet:bjorck"])
    rates: list[float] = []

    def recording_fit(*args: Any, **kwargs: Any) -> Any:
        total = kwargs["epochs"] * len(args[2])
        steps = range(kwargs["start_step"], kwargs["start_step"] + len(args[2]))
        rates.extend(lr_at(s, total, kwargs["lr"], kwargs["schedule"], kwargs["warmup"]) for s in steps)
        return fit(*args, **kwargs)

    monkeypatch.setattr("lipnet.bench.fmnist.fit", recording_fit)
    g = torch.Generator().manual_seed(0)
    train = ImageDataset(
        torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 10, 10, list("abcdefghij"), "noise"
    )
    recipe = apply_overrides(recipe, ["optim.batch_size=16"])  # 3 batches: the 6 steps go round twice
    timing = time_steps(chosen, recipe, train, torch.device("cpu"), rounds=2, steps=2, steps_per_epoch=50)
    run_total = 4 * 50  # the real run: 4 epochs of 50 steps, a 10% warm-up
    assert rates == [lr_at(s, run_total, 8e-3, "cosine", 0.1) for s in range(6)]
    assert rates[0] == pytest.approx(8e-3 / 20)
    (row,) = timing
    assert row["name"] == "lipnet:bjorck" and row["ratio"] == 1.0 and len(row["rounds"]) == 2
    assert row["sec_per_epoch"] == pytest.approx(row["ms_per_step"] * 50 / 1e3)
    with pytest.raises(ValueError, match="rounds"):
        time_steps(chosen, recipe, train, torch.device("cpu"), rounds=0)


def test_bench_under_a_config_with_taus_timing_and_resume(
    stripes_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--config`` sets the layout and recipe of every library, ``--taus`` gives one row per τ and model,
    ``--time-rounds`` the interleaved step times; a second call reads the finished rows back, and a call
    with another setup is refused."""
    pytest.importorskip("orthogonium")

    def bench(*extra: str) -> int:
        return main([
            "bench", "fmnist", "--data-dir", str(stripes_dir), "--out", str(tmp_path), "--device", "cpu",
            "--quiet", "--epochs", "1", "--batch-size", "32", *extra,
        ])  # fmt: skip

    args = [
        "--config", str(DEFAULT_RECIPE), "--models", "lipnet:bjorck,orthogonium:aoc", "--taus", "10,1",
        "--attack-n", "0", "--time-rounds", "1",
    ]  # fmt: skip
    assert bench(*args) == 0
    rows = _read(tmp_path / "fmnist.csv")
    assert [(r["tau"], r["library"]) for r in rows] == [
        ("10", "lipnet"), ("10", "orthogonium"), ("1", "lipnet"), ("1", "orthogonium"),
    ]  # fmt: skip
    # the config's layout (blocks 0, hidden 128), not fmnist_convnet_s's defaults
    anchor_layout = create("fmnist_convnet_s", conv="bjorck", blocks=0, hidden=128)
    assert int(rows[0]["params"]) == sum(p.numel() for p in anchor_layout.parameters())
    assert int(rows[0]["params"]) != sum(p.numel() for p in create("fmnist_convnet_s").parameters())
    assert len(list((tmp_path / "rows").glob("*.json"))) == 4 and (tmp_path / "setup.json").is_file()
    timing = json.loads((tmp_path / "timing.json").read_text(encoding="utf-8"))["rows"]
    assert [t["name"] for t in timing] == ["lipnet:bjorck", "orthogonium:aoc"] and timing[0]["ratio"] == 1
    assert timing[1]["sec_per_epoch"] == pytest.approx(timing[1]["ms_per_step"] * 13 / 1e3)  # 400 / 32
    md = (tmp_path / "fmnist.md").read_text(encoding="utf-8")
    for fragment in (
        "blocks=0, hidden=128", "τ per row (10, 1)", "adam lr 0.008", "linear warm-up over 10% of the steps",
        "same loop (lipnet.training.loop.fit)", "every bias zero", "ms/step (median)",
    ):  # fmt: skip
        assert fragment in md, fragment
    before = (tmp_path / "fmnist.csv").read_text(encoding="utf-8")
    capsys.readouterr()
    assert bench(*args[:-2]) == 0  # no timing: nothing is trained again
    assert capsys.readouterr().out.count("finished before") == 4
    assert (tmp_path / "fmnist.csv").read_text(encoding="utf-8") == before  # the same s/epoch: read back
    assert bench(*args, "--lr", "1e-3") == 2
    err = capsys.readouterr().err
    assert "another setup" in err and "optim" in err and len(err.splitlines()) == 1


def test_extra_contenders_are_trained_as_the_built_in_ones(stripes_dir: Path, tmp_path: Path) -> None:
    """An experiment's own network (the bcop network with 8-step dense layers) is selected by name,
    trained and certified like a built-in row, its Björck weights batched as lipnet's are; a taken name
    is refused before any data is read."""
    recipe = apply_overrides(
        load_config(DEFAULT_RECIPE), ["optim.epochs=1", "optim.batch_size=32", "device=cpu"]
    )
    bcop = get_layer_kind("bcop")
    kind = LayerKind(
        "bcop+dense8", bcop.block, bcop.conv, lambda i, o: BjorckLinear(i, o, train_iterations=8), ""
    )
    built: list[nn.Module] = []

    def build() -> nn.Module:
        layers = fmnist_layers(
            kind, activation=lambda _: GroupSort(2), pool=lambda: ScaledL2NormPool2d(2), blocks=0, hidden=128
        )
        built.append(nn.Sequential(*layers))
        return built[-1]

    extra = Contender("lipnet", "bcop+dense8", build)
    rows = bench_fmnist(
        recipe, taus=[10.0], models=["lipnet:bcop+dense8"], attack_n=0, data_dir=stripes_dir, progress=False,
        extra=[extra],
    )  # fmt: skip
    (row,) = rows
    assert (row["library"], row["kind"], row["epochs"]) == ("lipnet", "bcop+dense8", 1)
    assert row["clean"] > 0.5 and 0 < row["bound"] <= 1 + 1e-4  # it learnt the stripes, soundly bounded
    assert row["params"] == sum(p.numel() for p in built[0].parameters())
    # the two layers' frames and the two dense weights in batched Björck calls, as lipnet train has them
    batcher = built[0].weight_batcher
    assert isinstance(batcher, WeightBatcher) and len(batcher.members) == 4
    with pytest.raises(ValueError, match="lipnet:bcop is already a contender"):
        bench_fmnist(
            recipe, models=["lipnet:bcop"], data_dir=tmp_path, extra=[Contender("lipnet", "bcop", build)]
        )


def test_seeds_runs_each_seed_and_writes_their_mean(stripes_dir: Path, tmp_path: Path) -> None:
    """``--seeds 0,1``: one bench folder per seed (each its own setup seed), then the mean table."""
    assert _bench(tmp_path, stripes_dir, "--models", "lipnet:aol", "--seeds", "0,1", "--attack-n", "0") == 0
    for seed in (0, 1):
        folder = tmp_path / f"seed{seed}"
        setup = json.loads((folder / "setup.json").read_text(encoding="utf-8"))
        assert setup["seed"] == seed and (folder / "rows" / "lipnet_aol.json").is_file()
    rows = [_read(tmp_path / f"seed{seed}" / "fmnist.csv")[0] for seed in (0, 1)]
    assert rows[0]["clean"] != rows[1]["clean"] or rows[0]["mean_radius"] != rows[1]["mean_radius"]
    mean = 100 * (float(rows[0]["clean"]) + float(rows[1]["clean"])) / 2
    table = (tmp_path / "fmnist_seeds.md").read_text(encoding="utf-8")
    assert f"| 10 | lipnet | aol | 0, 1 | {mean:.2f} (" in table


def test_auto_trains_the_kind_of_each_tau_once(stripes_dir: Path, tmp_path: Path) -> None:
    """``lipnet:auto`` is lipnet's default front: at τ 0.5 the bcop row, at τ 10 the rko_bcop row
    (:func:`kind_for_tau`), each named by its kind; beside ``lipnet:bcop`` the bcop network trains once."""
    recipe = apply_overrides(
        load_config(DEFAULT_RECIPE), ["optim.epochs=1", "optim.batch_size=32", "device=cpu"]
    )
    rows = bench_fmnist(
        recipe, taus=[0.5, 10.0], models=["lipnet:auto", "lipnet:bcop"], attack_n=0, data_dir=stripes_dir,
        progress=False, out=tmp_path,
    )  # fmt: skip
    assert [(r["tau"], r["kind"]) for r in rows] == [(0.5, "bcop"), (10.0, "rko_bcop"), (10.0, "bcop")]
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == [
        "lipnet_bcop_tau0.5.json", "lipnet_bcop_tau10.json", "lipnet_rko-bcop_tau10.json",
    ]  # fmt: skip
    # the rko_bcop row is the one lipnet:rko_bcop would have trained: read back, not trained again
    again = bench_fmnist(
        recipe, taus=[10.0], models=["lipnet:rko_bcop"], attack_n=0, data_dir=stripes_dir, progress=False,
        out=tmp_path,
    )  # fmt: skip
    assert again == [rows[1]]
    assert "lipnet:auto" in {c.name for c in contenders()}

    def auto_at(tau: float | None, options: dict[str, str] | None = None) -> list[str]:
        available = contenders(lipnet_options=options)
        return [c.name for c in _at_tau(_select(available, ["lipnet:auto"]), available, tau)]

    assert auto_at(None) == ["lipnet:bcop"] == auto_at(min(AUTO_TAUS) / 2)  # AUTO_TAUS' contract
    # every network the rule trains is a selectable row (its rows are generated from AUTO_TAUS)
    names = {c.name for c in contenders()}
    assert all(auto_at(t)[0] in names for t in (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1e4))
    # from HOUSEHOLDER_TAU to the split, bcop with Householder activations (what conv: auto trains there)
    assert auto_at(5.0) == ["lipnet:bcop+householder"] and auto_at(AUTO_TAU_SPLIT) == ["lipnet:rko_bcop"]
    # from ROWNORM_TAU on, rko_bcop with a row-normalised head; a recipe that sets the head: rko_bcop
    assert auto_at(ROWNORM_TAU) == auto_at(100.0) == ["lipnet:rko_bcop+rownorm"]
    assert auto_at(100.0, {"head": "rownorm"}) == ["lipnet:rko_bcop"]
    (rownorm,) = [c for c in contenders() if c.name == "lipnet:rko_bcop+rownorm"]
    assert isinstance(rownorm.build()[-1], RowNormLinear)
    (hh,) = [c for c in contenders() if c.name == "lipnet:bcop+householder"]
    assert any(isinstance(m, HouseholderActivation) for m in hh.build().modules())
    # a recipe that sets the activation gives it to every lipnet row; auto then picks the kind alone
    assert auto_at(5.0, {"activation": "groupsort"}) == ["lipnet:bcop"]
    assert "lipnet:bcop+householder" not in {
        c.name for c in contenders(lipnet_options={"activation": "groupsort"})
    }


def test_a_saved_row_is_read_back_only_when_the_code_builds_the_network_it_trained(
    stripes_dir: Path, tmp_path: Path
) -> None:
    """A row records its network's fingerprint; a saved row of another fingerprint, or of none (written
    before rows recorded one), is trained again and overwritten, and the retrained row is bit for bit the
    one a fresh folder trains (the fingerprint's build leaves the random stream alone)."""
    recipe = apply_overrides(
        load_config(DEFAULT_RECIPE),
        ["optim.epochs=1", "optim.batch_size=32", "device=cpu", "data.n_train=96"],
    )
    size, layout, options = layout_of(recipe)
    (bjorck,) = _select(contenders(size, layout=layout, lipnet_options=options), ["lipnet:bjorck"])
    now = network_fingerprint(bjorck.build())
    lines: list[str] = []

    def run() -> dict[str, Any]:
        lines.clear()
        (row,) = bench_fmnist(
            recipe, taus=[10.0], models=["lipnet:bjorck"], attack_n=0, data_dir=stripes_dir, progress=False,
            out=tmp_path, log=lines.append,
        )  # fmt: skip
        return row

    def measured(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k != "sec_per_epoch"}  # the one key that is a timing

    first = run()
    path = tmp_path / "rows" / "lipnet_bjorck_tau10.json"
    assert first["network"] == now and json.loads(path.read_text(encoding="utf-8")) == first
    assert lines == ["lipnet:bjorck tau=10: training", lines[1]]
    assert run() == first and lines == [f"lipnet:bjorck tau=10: finished before ({path})"]

    stale = {**first, "network": "0123456789abcdef", "clean": -1.0}
    path.write_text(json.dumps(stale), encoding="utf-8")
    again = run()
    assert lines[:2] == [
        f"lipnet:bjorck tau=10: row in {path} was trained by another network definition "
        f"(fingerprint 0123456789abcdef, now {now}): training again",
        "lipnet:bjorck tau=10: training",
    ]
    assert measured(again) == measured(first)  # trained again, as in a fresh folder
    assert json.loads(path.read_text(encoding="utf-8")) == again  # overwritten

    unmarked = {k: v for k, v in first.items() if k != "network"}
    path.write_text(json.dumps({**unmarked, "clean": -1.0}), encoding="utf-8")
    again = run()
    assert lines[0] == (
        f"lipnet:bjorck tau=10: row in {path} has no network fingerprint (now {now}): training again"
    )
    assert measured(again) == measured(first) and json.loads(path.read_text(encoding="utf-8")) == again


def test_network_fingerprint_names_the_definition_not_the_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal for two builds of one contender (other initial weights), different when a layer setting or
    the kind differs, and for an anchor different when its library reports another version; the bench's
    fingerprint build is the trained one's and leaves the global random state as it was."""
    torch.manual_seed(0)
    three = network_fingerprint(BjorckLinear(32, 16))
    assert re.fullmatch(r"[0-9a-f]{16}", three)
    assert network_fingerprint(BjorckLinear(32, 16)) == three  # other weights, same definition
    assert network_fingerprint(BjorckLinear(32, 16, train_iterations=8)) != three
    found = {c.name: c for c in contenders("s", layout={"blocks": 0, "hidden": 128})}
    bcop, rko = found["lipnet:bcop"], found["lipnet:rko_bcop"]
    assert network_fingerprint(bcop.build()) == network_fingerprint(bcop.build())
    assert network_fingerprint(bcop.build()) != network_fingerprint(rko.build())

    recipe = load_config(DEFAULT_RECIPE, ["device=cpu"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    fingerprint = _network_of(bcop, recipe.seed)
    assert torch.equal(torch.get_rng_state(), state)
    assert _Trainee(bcop, recipe, torch.device("cpu")).network == fingerprint

    pytest.importorskip("orthogonium")
    aoc = found["orthogonium:aoc"]
    before = network_fingerprint(aoc.build()), network_fingerprint(bcop.build())
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda dist: "99.0" if dist == "orthogonium" else real(dist)
    )
    after = network_fingerprint(aoc.build()), network_fingerprint(bcop.build())
    assert after[0] != before[0] and after[1] == before[1]  # lipnet's bcop holds no orthogonium module
