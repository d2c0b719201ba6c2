"""``lipnet bench recipe``: the ablations toggle one element relative to the base, every run goes through
the one training loop on the same budget, and the table reports the runs' certification and the deltas."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from lipnet.bench.recipe import ABLATIONS, resolve_ablations
from lipnet.cli import main
from lipnet.training.config import Config, ConfigError, dump_config, load_config


def test_named_ablations_toggle_relative_to_the_base() -> None:
    plain = load_config(None, ["model.name=fmnist_convnet_s"])
    tuned = load_config(
        None,
        [
            "model.name=fmnist_convnet_s",
            "model.head=rownorm",
            "model.blocks=1",
            "optim.warmup=0.1",
            "optim.ema=0.99",
            "optim.clip_grad_norm=2",
            "loss.label_smoothing=0.2",
            "loss.offset=0.5",
            "optim.schedule=none",
        ],
    )
    names = ["warmup", "ema", "clip", "smoothing", "offset", "rownorm", "blocks", "constant_lr"]
    on = dict(resolve_ablations(plain, names))
    off = dict(resolve_ablations(tuned, names))
    assert on == {
        "warmup": ["optim.warmup=0.1"],
        "ema": ["optim.ema=0.999"],
        "clip": ["optim.clip_grad_norm=1"],
        "smoothing": ["loss.label_smoothing=0.1"],
        "offset": ["loss.offset=0.598961"],  # sqrt(2) x the middle radius: 108/255 of 36, 72, 108, 255 /255
        "rownorm": ["model.head=rownorm"],
        "blocks": ["model.blocks=0"],  # fmnist_convnet_s defaults to one block per stage
        "constant_lr": ["optim.schedule=none"],
    }
    assert off == {
        "warmup": ["optim.warmup=0"],
        "ema": ["optim.ema=null"],
        "clip": ["optim.clip_grad_norm=null"],
        "smoothing": ["loss.label_smoothing=0"],
        "offset": ["loss.offset=0"],
        "rownorm": ["model.head=kind"],
        "blocks": ["model.blocks=0"],
        "constant_lr": ["optim.schedule=cosine"],
    }
    scaled = dict(resolve_ablations(plain, ["lr_x2", "batch_half", "width_x2", "optim.lr=4e-3"]))
    assert scaled == {
        "lr_x2": ["optim.lr=0.002"],
        "batch_half": ["optim.batch_size=64"],
        "width_x2": ["model.width=32"],
        "optim.lr=4e-3": ["optim.lr=4e-3"],
    }


def test_the_default_list_holds_every_ablation_that_applies() -> None:
    small = load_config(None, ["model.name=small_cnn", "loss.name=hinge", "loss.margin=0.1"])
    names = [name for name, _ in resolve_ablations(small, None)]
    # small_cnn has no blocks; hinge takes no label smoothing or offset
    assert names == [n for n in ABLATIONS if n not in ("blocks", "smoothing", "offset")]


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        (["nope"], "unknown ablation 'nope'"),
        (["blocks"], "ablation 'blocks' does not apply"),
        (["optim.epochs=0"], "optim.epochs"),
        (["ema", "ema"], "repeat"),
    ],
)
def test_bad_ablations_are_config_errors(names: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        resolve_ablations(load_config(None), names)


def test_a_tiny_recipe_bench(
    tmp_path: Path, tiny_config: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config("unused")
    cfg.out = None
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(cfg), encoding="utf-8")
    out = tmp_path / "recipe"
    argv = [
        "bench", "recipe", "--config", str(config), "--epochs", "1", "--n-train", "32", "--n-test", "16",
        "--ablations", "ema,optim.lr=5e-3", "--out", str(out), "--quiet", "--threads", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    with (out / "recipe.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["ablation"] for r in rows] == ["base", "ema", "optim.lr=5e-3"]
    assert [r["overrides"] for r in rows] == ["", "optim.ema=0.999", "optim.lr=5e-3"]
    for row, folder in zip(rows, ("base-seed0", "ema-seed0", "optim.lr_5e-3-seed0"), strict=True):
        results = json.loads((out / "runs" / folder / "results.json").read_text(encoding="utf-8"))
        cert = results["certify"]
        # every run on the budget given: 1 epoch of the first 32 images, certified on 16
        assert results["epochs"] == 1 and results["data"]["n_train"] == 32 and cert["n"] == 16
        assert float(row["clean"]) == pytest.approx(cert["clean_accuracy"], abs=5e-5)
        assert float(row["mean_radius"]) == pytest.approx(cert["mean_radius"], abs=5e-5)
        assert [float(row[f"cert_{e}"]) for e in ("36/255", "72/255")] == pytest.approx(
            cert["certified_accuracy"], abs=5e-5
        )
        assert float(row["delta_clean"]) == pytest.approx(
            float(row["clean"]) - float(rows[0]["clean"]), abs=2e-4
        )
        assert float(row["sec_per_epoch"]) > 0
    md = (out / "recipe.md").read_text(encoding="utf-8")
    assert "| ema | `optim.ema=0.999` |" in md and "Base recipe: batch 32; adam lr 0.01" in md
    assert md in printed
    # run again: every run is read back, nothing is trained, the same table comes out
    before = (out / "recipe.csv").read_text(encoding="utf-8")
    assert main(argv) == 0
    assert "already trained" in capsys.readouterr().out
    assert (out / "recipe.csv").read_text(encoding="utf-8") == before
