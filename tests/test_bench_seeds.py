"""``lipnet bench seeds``: means and sample standard deviations over seeds of ``bench fmnist`` folders,
refusing folders that are not the same setup at other seeds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from lipnet.bench.fmnist import EPS
from lipnet.bench.seeds import seed_means, seeds_markdown
from lipnet.cli import main

SETUP = {"model": {"size": "s", "width": 16}, "optim": {"epochs": 4}, "attack": {"n": 0}, "device": "cpu"}


def _row(tau: float, library: str, kind: str, clean: float, radius: float) -> dict[str, Any]:
    return {
        "tau": tau, "library": library, "kind": kind, "params": 10, "epochs": 4.0, "sec_per_epoch": 1.0,
        "train_acc": clean, "clean": clean, "cert": [clean - 0.1 * (i + 1) for i in range(len(EPS))],
        "mean_radius": radius, "robust": None, "attack": "none", "bound": 1.0, "rule": "last-layer",
    }  # fmt: skip


def _folder(root: Path, seed: int, rows: list[dict[str, Any]], **setup: Any) -> Path:
    folder = root / f"seed{seed}"
    (folder / "rows").mkdir(parents=True)
    (folder / "setup.json").write_text(json.dumps({**SETUP, **setup, "seed": seed}), encoding="utf-8")
    for r in rows:
        (folder / "rows" / f"{r['library']}_{r['kind']}_tau{r['tau']:g}.json").write_text(json.dumps(r))
    return folder


def test_means_and_sample_deviations_per_network(tmp_path: Path) -> None:
    cleans = [0.70, 0.74, 0.75]
    folders = [
        _folder(tmp_path, seed, [_row(5, "lipnet", "bcop", c, 1.0 + seed), _row(0.5, "a", "b", 0.5, 2.0)])
        for seed, c in enumerate(cleans)
    ]
    # a network only the last two seeds have
    (folders[2] / "rows" / "x_y_tau0.5.json").write_text(json.dumps(_row(0.5, "x", "y", 0.9, 0.3)))
    (folders[1] / "rows" / "x_y_tau0.5.json").write_text(json.dumps(_row(0.5, "x", "y", 0.8, 0.1)))
    rows = seed_means(folders)
    assert [(r["tau"], r["library"], r["kind"], r["seeds"]) for r in rows] == [
        (0.5, "a", "b", [0, 1, 2]), (0.5, "x", "y", [1, 2]), (5, "lipnet", "bcop", [0, 1, 2]),
    ]  # fmt: skip
    bcop = rows[2]
    assert bcop["clean"] == pytest.approx(statistics.fmean(cleans))
    assert bcop["clean_sd"] == pytest.approx(statistics.stdev(cleans))  # n - 1 in the denominator
    assert bcop["cert"][2] == pytest.approx(statistics.fmean(c - 0.3 for c in cleans))
    assert bcop["mean_radius"] == pytest.approx(2.0) and bcop["mean_radius_sd"] == pytest.approx(1.0)
    assert rows[0]["clean_sd"] == 0 and rows[1]["clean"] == pytest.approx(0.85)
    table = seeds_markdown(rows, "header")
    assert "| 5 | lipnet | bcop | 0, 1, 2 | 73.00 (2.65) |" in table
    assert "| 0.5 | x | y | 1, 2 | 85.00 (7.07) |" in table


def test_only_one_setup_at_different_seeds_is_averaged(tmp_path: Path) -> None:
    rows = [_row(5, "lipnet", "bcop", 0.7, 1.0)]
    a = _folder(tmp_path / "a", 0, rows)
    with pytest.raises(ValueError, match="at least two run folders"):
        seed_means([a])
    other = _folder(tmp_path / "b", 1, rows, optim={"epochs": 20})
    with pytest.raises(ValueError, match=r"another setup .*\(differs in optim\)"):
        seed_means([a, other])
    same_seed = _folder(tmp_path / "c", 0, rows)
    with pytest.raises(ValueError, match="has seed 0, as an earlier folder"):
        seed_means([a, same_seed])
    with pytest.raises(ValueError, match="no setup.json"):
        seed_means([a, tmp_path])
    empty = _folder(tmp_path / "d", 3, [])
    with pytest.raises(ValueError, match="no finished rows"):
        seed_means([a, empty])


def test_cli_prints_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folders = [str(_folder(tmp_path, s, [_row(5, "lipnet", "bcop", 0.7 + s / 100, 1.0)])) for s in (0, 1)]
    out = tmp_path / "means.md"
    assert main(["bench", "seeds", *folders, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 5 | lipnet | bcop | 0, 1 | 70.50 (0.71) |" in printed
    assert out.read_text(encoding="utf-8") in printed
    assert main(["bench", "seeds", folders[0]]) == 2
    assert "at least two run folders" in capsys.readouterr().err
