"""The tau sweep: one run per value, csv/md/png, validation before training, value-by-value resume."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lipnet.training.config import Config, ConfigError
from lipnet.training.runs import RunError, RunFolder
from lipnet.training.sweep import SweepResult, run_sweep, sweep_configs, value_dirname


def _base(tiny_config: Callable[..., Config]) -> Config:
    # 32 images in one batch, one epoch: one optimiser step per value
    return tiny_config("unused", "data.n_train=32", "optim.epochs=1")


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, tiny_config: Callable[..., Config]) -> SweepResult:
    out = tmp_path_factory.mktemp("sweep")
    return run_sweep(_base(tiny_config), "tau", [10.0, 0.5], out, progress=False)


def test_sweep_writes_csv_md_png(swept: SweepResult) -> None:
    out = swept.csv_path.parent
    assert [r.value for r in swept.rows] == [0.5, 10.0]
    assert [r.run_dir for r in swept.rows] == [out / "runs" / "tau-0.5", out / "runs" / "tau-10"]
    for row in swept.rows:
        assert RunFolder(row.run_dir).has_results()
        assert len(row.certified_accuracy) == 2 and row.empirical_accuracy is not None
        assert 0 <= row.certified_accuracy[1] <= row.certified_accuracy[0] <= row.clean_accuracy <= 1
        assert (row.run_dir / "empirical.json").is_file()
    assert swept.violations == []
    with swept.csv_path.open(encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == [
        "tau",
        "clean_acc",
        "cert_acc@36/255",
        "cert_acc@72/255",
        "mean_radius",
        "emp_acc@36/255",
        "emp_acc@72/255",
        "train_time_s",
        "lipschitz",
        "run",
    ]
    assert [float(r["tau"]) for r in table] == [0.5, 10.0]
    assert float(table[1]["clean_acc"]) == swept.rows[1].clean_accuracy
    md = swept.md_path.read_text(encoding="utf-8")
    assert "| tau | clean | cert. ε=36/255 |" in md and md.count("\n| ") == 3
    assert "kind" not in md  # only a config with model.conv: auto gets the column
    assert swept.png_path is not None and swept.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_with_conv_auto_names_each_runs_kind(
    tiny_config: Callable[..., Config], tmp_path: Path
) -> None:
    base = tiny_config("unused", "data.n_train=32", "optim.epochs=1", "model.conv=auto", "sweep.attack_n=0")
    result = run_sweep(base, "tau", [0.5, 10.0], tmp_path, progress=False)
    md = result.md_path.read_text(encoding="utf-8")
    header = next(line for line in md.splitlines() if line.startswith("| tau |"))
    assert header.rstrip(" |").endswith("kind")
    rows = [line for line in md.splitlines() if line.startswith("| 0.5 |") or line.startswith("| 10 |")]
    assert [row.rstrip(" |").rsplit("|", 1)[-1].strip() for row in rows] == ["bcop", "rko_bcop"]
    for row, kind in zip(result.rows, ["bcop", "rko_bcop"], strict=True):
        meta = RunFolder(row.run_dir).load_checkpoint("final").meta
        assert meta["model"]["kwargs"]["conv"] == kind


def test_sweep_resumes_value_by_value(
    swept: SweepResult, tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lipnet.training.run
    import lipnet.training.sweep

    out = swept.csv_path.parent
    before = swept.csv_path.read_text(encoding="utf-8")
    # a half-done value: its last checkpoint is there, its certification is not
    half = RunFolder(out / "runs" / "tau-10")
    half.results_path.unlink()
    (half.checkpoint_dir / "final.json").unlink()
    calls: list[tuple[str | None, bool]] = []
    real_train = lipnet.training.run.train

    def spy(cfg: Config, **kwargs: object) -> lipnet.training.run.TrainResult:
        calls.append((cfg.out, bool(kwargs.get("resume"))))
        return real_train(cfg, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lipnet.training.run, "train", spy)
    again = run_sweep(_base(tiny_config), "tau", [0.5, 10.0], out, progress=False)
    assert calls == [(str(half.path), True)]
    assert half.has_results()
    assert [r.clean_accuracy for r in again.rows] == [r.clean_accuracy for r in swept.rows]
    assert [r.empirical_accuracy for r in again.rows] == [r.empirical_accuracy for r in swept.rows]
    # the resumed value keeps its training time, certification and cached attack: the same table
    assert swept.csv_path.read_text(encoding="utf-8") == before


def test_sweep_resumes_a_value_without_its_summary(
    swept: SweepResult, tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lipnet.training.run
    import lipnet.training.sweep

    out = swept.csv_path.parent
    before = swept.csv_path.read_text(encoding="utf-8")
    # results.json without summary.md: a run killed at the end (as the old write order allowed) is
    # not finished, whatever results.json says
    unfinished = RunFolder(out / "runs" / "tau-0.5")
    unfinished.summary_path.unlink()
    calls: list[tuple[str | None, bool]] = []
    real_train = lipnet.training.run.train

    def spy(cfg: Config, **kwargs: object) -> lipnet.training.run.TrainResult:
        calls.append((cfg.out, bool(kwargs.get("resume"))))
        return real_train(cfg, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lipnet.training.run, "train", spy)
    run_sweep(_base(tiny_config), "tau", [0.5, 10.0], out, progress=False)
    assert calls == [(str(unfinished.path), True)]
    assert unfinished.is_finished() and "| n | clean |" in unfinished.summary_path.read_text(encoding="utf-8")
    assert swept.csv_path.read_text(encoding="utf-8") == before


def test_sweep_refuses_runs_of_another_config(
    swept: SweepResult, tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lipnet.training.run

    monkeypatch.setattr(lipnet.training.run, "train", _no_training)
    other = _base(tiny_config)
    other.optim.lr = 0.5
    with pytest.raises(RunError, match=r"optim\.lr"):
        run_sweep(other, "tau", [0.5, 10.0, 20.0], swept.csv_path.parent, progress=False)
    assert not (swept.csv_path.parent / "runs" / "tau-20").exists()


def _no_training(*args: object, **kwargs: object) -> None:
    raise AssertionError("nothing may be trained")


@pytest.mark.parametrize(
    ("param", "values", "fragment"),
    [
        ("tau", [1.0, 0.0], "loss.tau must be > 0"),
        ("tau", [1.0, 1.0], "repeated"),
        ("tau", [], "--taus"),
        ("margin", [0.1], "unknown argument"),
        ("alpha", [0.5, 2.0], "loss.alpha must lie in"),
        ("gamma", [1.0], "cannot sweep 'gamma'"),
    ],
)
def test_sweep_values_are_validated_first(
    tiny_config: Callable[..., Config], tmp_path: Path, param: str, values: list[float], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        sweep_configs(_base(tiny_config), param, values, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_hkr_alphas_and_dirnames(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    base = tiny_config("unused", "loss.name=hkr", "loss.margin=0.1")
    base.loss.kwargs.pop("tau")
    configs = sweep_configs(base, "alpha", [0.99, 0.9], tmp_path)
    assert [v for v, _ in configs] == [0.9, 0.99]
    assert [c.loss.kwargs for _, c in configs] == [
        {"margin": 0.1, "alpha": 0.9},
        {"margin": 0.1, "alpha": 0.99},
    ]
    assert configs[0][1].out == str(tmp_path / "runs" / "alpha-0.9")
    assert value_dirname("tau", 100.0) == "tau-100" and value_dirname("margin", 1e-3) == "margin-0.001"


def test_any_parameter_the_loss_declares_can_be_swept(
    tiny_config: Callable[..., Config], tmp_path: Path
) -> None:
    """The loss says what it can sweep (lipnet.losses.sweepable), with each value's range: focal's gamma
    and Poly-1's epsilon, not only tau, margin and alpha."""
    focal = tiny_config("unused", "loss.name=focal", "loss.gamma=2")
    configs = sweep_configs(focal, "gamma", [2.0, 0.0, 0.5], tmp_path)
    assert [v for v, _ in configs] == [0.0, 0.5, 2.0]
    assert [c.loss.kwargs["gamma"] for _, c in configs] == [0.0, 0.5, 2.0]
    assert configs[0][1].out == str(tmp_path / "runs" / "gamma-0")
    with pytest.raises(ConfigError, match="loss.gamma must be >= 0"):
        sweep_configs(focal, "gamma", [1.0, -1.0], tmp_path)
    with pytest.raises(ConfigError, match="cannot sweep 'alpha' with loss 'focal': it takes it, but"):
        sweep_configs(focal, "alpha", [0.5], tmp_path)  # per-class weights, not a scalar
    poly = tiny_config("unused", "loss.name=poly1", "loss.epsilon=1")
    configs = sweep_configs(poly, "epsilon", [2.0, -1.0], tmp_path)
    assert [(v, c.loss.kwargs["epsilon"]) for v, c in configs] == [(-1.0, -1.0), (2.0, 2.0)]
    assert [Path(c.out or "").name for _, c in configs] == ["epsilon--1", "epsilon-2"]
    with pytest.raises(ConfigError, match="loss.epsilon must be >= -1"):
        sweep_configs(poly, "epsilon", [-1.5], tmp_path)
    with pytest.raises(ConfigError, match=r"no values to sweep: give --epsilons V1,V2 \(or --param epsilon"):
        sweep_configs(poly, "epsilon", [], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_sweep_parameter_of_a_config_is_one_a_loss_declares(tiny_config: Callable[..., Config]) -> None:
    poly = ("loss.name=poly1", "loss.epsilon=1", "sweep.param=epsilon")
    cfg = tiny_config("unused", *poly, "sweep.values=[0, 1]")
    assert cfg.sweep.param == "epsilon" and cfg.sweep.values == [0.0, 1.0]
    with pytest.raises(ConfigError, match="sweep.param must be a loss argument"):
        tiny_config("unused", "sweep.param=no_such_parameter")
    with pytest.raises(ConfigError, match="loss.epsilon must be >= -1"):
        tiny_config("unused", *poly, "sweep.values=[-2]")


def test_parallel_jobs_train_the_same_runs(
    tiny_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two values in two worker processes (one torch thread each) give the runs one process gives with one
    # thread: same clean accuracy, radii and bound; the main process itself trains nothing
    threads = torch.get_num_threads()
    base = _base(tiny_config)
    base.sweep.attack_n = 0

    def not_here(cfg: Config, **kwargs: object) -> None:
        raise AssertionError(f"{cfg.out} was trained in the main process")

    try:
        torch.set_num_threads(1)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "get_num_threads", lambda: 2)
            patch.setattr("lipnet.training.run.train", not_here)  # the spawned workers import the real one
            parallel = run_sweep(base, "tau", [0.5, 10.0], tmp_path / "parallel", progress=False, jobs=2)
        sequential = run_sweep(base, "tau", [0.5, 10.0], tmp_path / "sequential", progress=False)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(parallel.rows, sequential.rows, strict=True):
        assert (a.value, a.clean_accuracy, a.certified_accuracy, a.mean_radius, a.lipschitz) == (
            b.value,
            b.clean_accuracy,
            b.certified_accuracy,
            b.mean_radius,
            b.lipschitz,
        )
    trained: list[str] = []
    monkeypatch.setattr("lipnet.training.run.train", lambda cfg, **kwargs: trained.append(str(cfg.out)))
    run_sweep(base, "tau", [0.5, 10.0], tmp_path / "parallel", progress=False, jobs=2)
    assert trained == []


def test_jobs_must_be_positive(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_sweep(_base(tiny_config), "tau", [0.5], tmp_path, progress=False, jobs=0)


def test_a_worker_heads_each_line_with_its_label_once(
    tiny_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the worker's lines share a terminal or log file with the other workers': each is headed by its
    # value, once ("[tau=0.5] training ...", not "[tau=0.5] tau=0.5: training ...")
    from lipnet.training.sweep import _train_in_worker

    threads = torch.get_num_threads()
    cfg = _base(tiny_config)
    cfg.out = str(tmp_path / "run")
    try:
        _train_in_worker(cfg, "tau=0.5", 1, quiet=False)
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("[tau=0.5] ") for line in lines)
    assert lines[0] == f"[tau=0.5] training {cfg.out}"
    assert not any("tau=0.5:" in line for line in lines)
