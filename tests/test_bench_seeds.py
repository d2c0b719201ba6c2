"""``lipnet bench seeds``: means and sample standard deviations over seeds of ``bench fmnist`` folders,
lipnet's paired differences against the anchors, refusing folders that are not the same setup or that
count a network twice for one seed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from certify.radius import format_eps
from lipnet.bench.fmnist import EPS, contenders
from lipnet.bench.seeds import differences_markdown, paired_differences, seed_means, seeds_markdown
from lipnet.cli import main
from lipnet.layers.kinds import AUTO

SETUP = {"model": {"size": "s", "width": 16}, "optim": {"epochs": 4}, "attack": {"n": 0}, "device": "cpu"}


def _row(tau: float, library: str, kind: str, clean: float, radius: float) -> dict[str, Any]:
    return {
        "tau": tau, "library": library, "kind": kind, "params": 10, "epochs": 4.0, "sec_per_epoch": 1.0,
        "train_acc": clean, "clean": clean, "cert": [clean - 0.1 * (i + 1) for i in range(len(EPS))],
        "mean_radius": radius, "robust": None, "attack": "none", "bound": 1.0, "rule": "last-layer",
    }  # fmt: skip


def _folder(root: Path, seed: int, rows: list[dict[str, Any]], name: str = "", **setup: Any) -> Path:
    folder = root / (name or f"seed{seed}")
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
    with pytest.raises(ValueError, match=r"has lipnet:bcop at tau 5 for seed 0, as .*a/seed0 does"):
        seed_means([a, same_seed])
    other_network = _folder(tmp_path / "e", 0, [_row(5, "lipnet", "aol", 0.6, 1.0)])
    with pytest.raises(ValueError, match="at least two seeds, got seed 0 only"):
        seed_means([a, other_network])
    with pytest.raises(ValueError, match="no setup.json"):
        seed_means([a, tmp_path])
    empty = _folder(tmp_path / "d", 3, [])
    with pytest.raises(ValueError, match="no finished rows"):
        seed_means([a, empty])


def test_a_seed_split_over_folders_counts_once_and_models_select_rows(tmp_path: Path) -> None:
    """One run's networks trained as separate processes (two folders of seed 0) are one seed; ``models``
    keeps those networks only, which also lets a folder's other rows repeat a network elsewhere."""
    seed0 = [
        _folder(tmp_path, 0, [_row(5, "lipnet", "bcop", 0.70, 1.0)], name="s0_lipnet"),
        _folder(tmp_path, 0, [_row(5, "a", "b", 0.60, 1.0), _row(5, "lipnet", "old", 0.1, 0.1)], name="s0_a"),
        _folder(tmp_path, 0, [_row(5, "lipnet", "old", 0.2, 0.2)], name="s0_old"),
    ]
    seed1 = _folder(tmp_path, 1, [_row(5, "lipnet", "bcop", 0.72, 1.0), _row(5, "a", "b", 0.64, 1.0)])
    with pytest.raises(ValueError, match="lipnet:old at tau 5 for seed 0"):
        seed_means([*seed0, seed1])
    rows = seed_means([*seed0, seed1], models=["lipnet:bcop", "a:b"])
    assert [(r["library"], r["kind"], r["seeds"]) for r in rows] == [
        ("a", "b", [0, 1]), ("lipnet", "bcop", [0, 1]),
    ]  # fmt: skip
    assert rows[1]["clean"] == pytest.approx(0.71)
    with pytest.raises(ValueError, match="no rows of lipnet:cayley in"):
        seed_means([*seed0, seed1], models=["lipnet:bcop", "lipnet:cayley"])


def test_lipnet_auto_selects_the_network_auto_trains_at_each_tau(tmp_path: Path) -> None:
    """``lipnet:auto`` keeps, per τ, the lipnet row of the network ``lipnet bench fmnist``'s ``lipnet:auto``
    trains there for the folders' setup, and no other lipnet row."""
    model = {"size": "s", "width": 16, "blocks": 0, "hidden": 128, "lipnet": {}}
    (auto,) = (c for c in contenders("s", layout={"width": 16, "blocks": 0, "hidden": 128}) if c.kind == AUTO)
    assert auto.kind_at is not None
    at = {tau: auto.kind_at(tau).removeprefix("lipnet:") for tau in (0.5, 5.0, 100.0)}
    rows = [_row(tau, "lipnet", kind, 0.8, 1.0) for tau, kind in at.items()]
    rows += [
        _row(5.0, "lipnet", "bjorck", 0.7, 1.0),
        _row(5.0, "a", "b", 0.6, 1.0),
    ]  # auto never trains bjorck
    folders = [_folder(tmp_path, s, rows, model=model) for s in (0, 1)]
    kept = seed_means(folders, models=["lipnet:auto", "a:b"])
    assert sorted((r["tau"], r["kind"]) for r in kept) == sorted([*at.items(), (5.0, "b")])
    assert [(p["tau"], p["kind"]) for p in paired_differences(folders, models=["lipnet:auto", "a:b"])] == [
        (5.0, at[5.0])
    ]
    with pytest.raises(ValueError, match="no rows of lipnet:auto"):
        seed_means(
            [_folder(tmp_path / "b", s, rows[3:], model=model) for s in (0, 1)], models=["lipnet:auto"]
        )


def test_paired_differences_against_each_anchor(tmp_path: Path) -> None:
    """Per τ, lipnet minus each anchor over the seeds both have: the mean of the per-seed differences and
    its standard error sd / sqrt(n); a pair sharing one seed is left out; ``behind`` names the columns
    with a negative mean."""
    ours = [(0.80, 0.50), (0.82, 0.52), (0.81, 0.60)]  # (clean, radius) per seed
    theirs = [(0.79, 0.55), (0.80, 0.53), (0.83, 0.51)]
    folders = [
        _folder(
            tmp_path,
            seed,
            [_row(5, "lipnet", "bcop", *o), _row(5, "a", "b", *t), _row(0.5, "a", "b", 0.5, 1.0)]
            + ([_row(5, "x", "y", 0.1, 0.1)] if seed == 0 else []),
        )
        for seed, (o, t) in enumerate(zip(ours, theirs, strict=True))
    ]
    (pair,) = paired_differences(folders)  # x:y shares one seed; no lipnet network at tau 0.5
    assert (pair["tau"], pair["kind"], pair["anchor"], pair["seeds"]) == (5, "bcop", "a:b", [0, 1, 2])
    clean = [o[0] - t[0] for o, t in zip(ours, theirs, strict=True)]  # +0.01, +0.02, -0.02
    radius = [o[1] - t[1] for o, t in zip(ours, theirs, strict=True)]  # -0.05, -0.01, +0.09
    assert pair["clean"] == pytest.approx(statistics.fmean(clean))
    assert pair["clean_se"] == pytest.approx(statistics.stdev(clean) / 3**0.5)
    assert pair["cert"] == pytest.approx([statistics.fmean(clean)] * len(EPS))  # _row: cert = clean - const
    assert pair["mean_radius"] == pytest.approx(statistics.fmean(radius))
    assert pair["mean_radius_se"] == pytest.approx(statistics.stdev(radius) / 3**0.5)
    assert pair["behind"] == []
    ahead = [[_row(5, "lipnet", "bcop", 0.8, 0.5), _row(5, "a", "b", 0.8 + s / 100, 0.4)] for s in (0, 1)]
    theirs_ahead = [_folder(tmp_path / "b", s, rows) for s, rows in enumerate(ahead)]
    (pair,) = paired_differences(theirs_ahead)
    assert pair["behind"] == ["clean", *(format_eps(e) for e in EPS)] and pair["mean_radius"] > 0
    table = differences_markdown([pair], "header")
    assert "| 5 | bcop | a:b | 0, 1 | -0.50 (0.50) |" in table
    assert "| +0.1000 (0.0000) | clean, 0.1," in table


def test_cli_prints_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folders = [str(_folder(tmp_path, s, [_row(5, "lipnet", "bcop", 0.7 + s / 100, 1.0)])) for s in (0, 1)]
    out = tmp_path / "means.md"
    assert main(["bench", "seeds", *folders, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 5 | lipnet | bcop | 0, 1 | 70.50 (0.71) |" in printed
    assert out.read_text(encoding="utf-8") in printed
    assert "minus each anchor" not in printed  # no anchor to pair with
    pair = [_row(5, "lipnet", "bcop", 0.7, 1.0), _row(5, "a", "b", 0.6, 1.0)]
    anchored = [str(_folder(tmp_path / "anchored", s, pair)) for s in (0, 1)]
    assert main(["bench", "seeds", *anchored, "--models", "lipnet:bcop,a:b"]) == 0
    assert "| 5 | bcop | a:b | 0, 1 | +10.00 (0.00) |" in capsys.readouterr().out
    assert main(["bench", "seeds", folders[0]]) == 2
    assert "at least two run folders" in capsys.readouterr().err
