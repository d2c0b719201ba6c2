"""Crash safety of run folders: a kill at any file commit resumes to the folder of an uninterrupted run,
``results.json`` is written last, a second run into a folder in use is refused, a checkpoint that
does not fit the model is one line, and a killed run's temporary files are cleaned up."""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import certify.io
import lipnet.training.plots
import lipnet.training.runs
from certify.io import matplotlib_available
from lipnet.cli import main
from lipnet.training.config import Config, dump_config
from lipnet.training.run import TrainResult, load_run_model, train
from lipnet.training.runs import RunError, RunFolder

#: Every file commit of the tiny run (2 epochs of 2 steps), in order: the atomic writer's calls.
COMMITS: tuple[str, ...] = (
    "config.yaml",
    "checkpoints/last-e0001-s2.safetensors",
    "checkpoints/last.json",
    "metrics.jsonl",
    "metrics.csv",
    "checkpoints/last-e0002-s4.safetensors",
    "checkpoints/last.json",
    "metrics.jsonl",
    "metrics.csv",
    "checkpoints/final.json",
    "radii.safetensors",
    "summary.md",
    *(("curves.png",) if matplotlib_available() else ()),
    "results.json",
)


class _Killed(BaseException):
    """Raised in place of a file commit: the process 'dies' there (no except Exception catches it)."""


def _patch_writer(mp: pytest.MonkeyPatch, before_commit: Callable[[Path], None]) -> None:
    """Call ``before_commit(path)`` before each atomic write of the run folder and of the plots."""
    real = lipnet.training.runs.atomic_write_bytes

    def write(path: str | os.PathLike[str], data: bytes) -> None:
        before_commit(Path(path))
        real(path, data)

    # atomic_write_text/json (certify.io) call certify.io's module global;
    # runs and plots imported the name itself
    mp.setattr(certify.io, "atomic_write_bytes", write)
    mp.setattr(lipnet.training.runs, "atomic_write_bytes", write)
    mp.setattr(lipnet.training.plots, "atomic_write_bytes", write)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, tiny_config: Callable[..., Config]
) -> tuple[TrainResult, list[str]]:
    """An uninterrupted tiny run, and the files it committed, in order (relative to the run folder)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    commits: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        _patch_writer(mp, lambda path: commits.append(path.relative_to(out).as_posix()))
        result = train(tiny_config(out), progress=False)
    return result, commits


def _files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def _without_time(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "time"}


def _assert_same_run(path: Path, ref_path: Path, ref_model: torch.nn.Module) -> None:
    """The run at ``path`` is whole, self-consistent, and equals the reference up to wall-clock times."""
    run, ref = RunFolder(path), RunFolder(ref_path)
    assert _files(run.path) == _files(ref.path)
    assert not run.lock_path.exists()
    rows = run.read_metrics()
    assert [_without_time(r) for r in rows] == [_without_time(r) for r in ref.read_metrics()]
    with run.metrics_csv.open(encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [{k: float(v) for k, v in r.items()} for r in table] == rows  # csv says what jsonl says
    last, final = run.load_checkpoint("last"), run.load_checkpoint("final")
    assert (last.epoch, last.step) == (final.epoch, final.step) == (2, 4)
    assert last.meta["history"] == rows  # the metrics files are the checkpoint's history
    for key, value in ref_model.state_dict().items():  # resumed bitwise
        assert torch.equal(final.model[key], value), key
    results, ref_results = run.read_results(), ref.read_results()
    assert results["final_epoch"] == rows[-1] and results["train_time"] == last.meta["train_time"]

    def timeless(r: dict[str, Any]) -> dict[str, Any]:
        return {**r, "run": None, "train_time": None, "final_epoch": _without_time(r["final_epoch"])}

    assert timeless(results) == timeless(ref_results)
    for key, value in ref.read_radii().items():
        assert torch.equal(run.read_radii()[key], value), key
    summary = run.summary_path.read_text(encoding="utf-8").splitlines()
    ref_summary = ref.summary_path.read_text(encoding="utf-8").splitlines()
    # the training line holds the wall-clock time; everything else is the same text
    assert [s for s in summary if not s.startswith("- training:")] == [
        s for s in ref_summary if not s.startswith("- training:")
    ]
    assert f"{results['train_time']:.1f} s" in next(s for s in summary if s.startswith("- training:"))
    if matplotlib_available():
        assert run.curves_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_json_is_committed_last(reference: tuple[TrainResult, list[str]]) -> None:
    _, commits = reference
    assert tuple(commits) == COMMITS


@pytest.mark.parametrize("k", range(len(COMMITS)), ids=[f"{k}-{name}" for k, name in enumerate(COMMITS)])
def test_a_kill_at_any_commit_resumes_to_the_uninterrupted_run(
    k: int,
    reference: tuple[TrainResult, list[str]],
    tiny_config: Callable[..., Config],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref_result, _ = reference
    cfg = tiny_config(tmp_path / "run")
    count = [0]

    def die_at_k(path: Path) -> None:
        if count[0] == k:
            # killed in the middle of writing commit k: its temporary file stays behind, half written
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp").write_bytes(b"half a file")
            raise _Killed(path.name)
        count[0] += 1

    _patch_writer(monkeypatch, die_at_k)
    with pytest.raises(_Killed):
        train(cfg, progress=False)
    monkeypatch.undo()
    run = RunFolder(cfg.out or "")
    assert not run.results_path.exists()  # nothing but the last commit marks a run finished
    assert any(p.name.endswith(".tmp") for p in run.path.rglob("*"))
    # what a user does next: --resume a started run; a run killed before its config starts afresh
    result = train(cfg, resume=run.config_path.exists(), progress=False)
    assert result.finished
    _assert_same_run(run.path, ref_result.run_dir, ref_result.model)


def test_a_kill_during_the_repairs_of_a_resume_is_repaired_too(
    reference: tuple[TrainResult, list[str]],
    tiny_config: Callable[..., Config],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref_result, _ = reference
    cfg = tiny_config(tmp_path / "run")
    names: list[str] = []

    def die_before_the_metrics_of_epoch_2(path: Path) -> None:
        names.append(path.name)
        if names.count("metrics.jsonl") == 2:  # epoch 2's checkpoint is committed, its metrics row not
            raise _Killed(path.name)

    _patch_writer(monkeypatch, die_before_the_metrics_of_epoch_2)
    with pytest.raises(_Killed):
        train(cfg, progress=False)
    assert len(RunFolder(cfg.out or "").read_metrics()) == 1
    monkeypatch.undo()
    names.clear()

    def die_after_the_jsonl_repair(path: Path) -> None:
        names.append(path.name)
        if path.name == "metrics.csv":
            raise _Killed(path.name)

    _patch_writer(monkeypatch, die_after_the_jsonl_repair)
    with pytest.raises(_Killed):
        train(cfg, resume=True, progress=False)
    assert names == ["metrics.jsonl", "metrics.csv"]  # the resume's first writes are the repairs
    monkeypatch.undo()
    assert train(cfg, resume=True, progress=False).finished
    _assert_same_run(Path(cfg.out or ""), ref_result.run_dir, ref_result.model)


# ---------------------------------------------------------------------------------------------
# a real process, killed with SIGKILL


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL and SIGSTOP")
def test_sigkill_of_lipnet_train_then_resume(
    reference: tuple[TrainResult, list[str]],
    tiny_config: Callable[..., Config],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref_result, _ = reference
    cfg = tiny_config("unused")
    cfg.out = None
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(dump_config(cfg), encoding="utf-8")
    run = RunFolder(tmp_path / "run")
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lipnet.cli", "train", "--config", str(config_path)]
            + ["--out", str(run.path), "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=err_fh,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        # the first checkpoint is committed: stop the process wherever it is now (one epoch and the
        # certification are still ahead of it, so it is still running and holding the folder)
        deadline = time.monotonic() + 300
        while not (run.checkpoint_dir / "last.json").exists():
            assert proc.poll() is None, stderr.read_text(encoding="utf-8")
            assert time.monotonic() < deadline, "lipnet train wrote no checkpoint in 300 s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None, "lipnet train finished before it could be stopped"

        # a second lipnet train into the folder in use is refused
        assert main(["train", "--resume", str(run.path), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("lipnet train: error: "), err
        assert "in use by another lipnet train" in err and f"pid {proc.pid}" in err

        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert run.lock_path.exists()  # the killed holder could not delete it; its flock died with it

    assert main(["train", "--resume", str(run.path), "--quiet"]) == 0, capsys.readouterr().err
    _assert_same_run(run.path, ref_result.run_dir, ref_result.model)


# ---------------------------------------------------------------------------------------------
# the lock


def test_a_second_run_into_a_locked_folder_is_refused(
    tiny_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path / "run")
    run = RunFolder(cfg.out or "")
    with run.lock():
        assert run.lock_path.read_text(encoding="utf-8") == f"{os.getpid()}\n"
        with pytest.raises(RunError, match=f"in use by another lipnet train \\(pid {os.getpid()}"):
            train(cfg, progress=False)
        assert _files(run.path) == ["train.lock"]  # the refused run wrote nothing
    assert not run.path.exists()  # the lock's own folder goes with it when nothing else was written

    train(cfg, progress=False, stop_after_epoch=1)

    def contents() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file() and p != run.lock_path}

    with run.lock():
        before = contents()
        assert main(["train", "--resume", str(run.path), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "in use by another lipnet train" in err, err
        assert contents() == before
    assert not run.lock_path.exists()


def test_a_stale_lock_file_does_not_block(tmp_path: Path) -> None:
    if lipnet.training.runs.fcntl is None:
        pytest.skip("without fcntl a stale lock file blocks by design (see the next test)")
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.lock_path.write_text("999999999\n", encoding="utf-8")  # left by a killed run
    with run.lock():
        assert run.lock_path.read_text(encoding="utf-8") == f"{os.getpid()}\n"
    assert not run.lock_path.exists() and run.path.is_dir()


def test_the_pid_file_lock_without_fcntl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lipnet.training.runs, "fcntl", None)
    run = RunFolder(tmp_path / "run")
    with run.lock():
        assert run.lock_path.read_text(encoding="utf-8") == f"{os.getpid()}\n"
        with pytest.raises(RunError, match=f"pid {os.getpid()}.*delete"), run.lock():
            pass
        assert run.lock_path.exists()  # the refused attempt left the holder's lock alone
    assert not run.path.exists()
    run.path.mkdir()
    run.lock_path.write_text("999999999\n", encoding="utf-8")  # left by a killed run
    with pytest.raises(RunError, match=r"pid 999999999.*no longer running, delete .*train\.lock"):
        with run.lock():
            pass


# ---------------------------------------------------------------------------------------------
# leftovers and checkpoints that do not fit


def test_leftovers_are_removed_when_a_run_is_opened(
    reference: tuple[TrainResult, list[str]], tiny_config: Callable[..., Config], tmp_path: Path
) -> None:
    ref_result, _ = reference
    run = RunFolder(tmp_path / "run")
    shutil.copytree(ref_result.run_dir, run.path)
    tmp_name = f".metrics.csv.{secrets.token_hex(8)}.tmp"
    leftovers = [run.path / tmp_name, run.checkpoint_dir / f".last.json.{secrets.token_hex(8)}.tmp"]
    # a tensor file committed by a run killed before its sidecar (or before it deleted the old one)
    leftovers.append(run.checkpoint_dir / "last-e0001-s2.safetensors")
    # not the atomic writer's names, or not in the run folder: left alone
    kept = [run.path / "notes.tmp", run.path / ".metrics.csv.tmp", run.path / "sub" / tmp_name]
    kept.append(tmp_path / f".config.yaml.{secrets.token_hex(8)}.tmp")
    for p in leftovers + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert train(tiny_config(run.path), resume=True, progress=False).finished  # already finished
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in kept)


def test_resume_with_a_checkpoint_that_does_not_fit_is_one_line(
    tiny_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path / "run")
    train(cfg, progress=False, stop_after_epoch=1)
    run = RunFolder(cfg.out or "")
    # config.yaml edited after the run started: another width, so all but the last bias change shape
    run.config_path.write_text(
        run.config_path.read_text(encoding="utf-8").replace("width: 4", "width: 8"), encoding="utf-8"
    )
    assert run.read_config().model.kwargs["width"] == 8
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run.path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"lipnet train: error: cannot resume {run.path}: its 'last' checkpoint does not")
    assert "11 tensors differ, first 3: 0.bias has shape (4,) in the checkpoint, (8,) in the model;" in err
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == before


def test_a_model_checkpoint_that_does_not_fit_names_the_tensors(
    reference: tuple[TrainResult, list[str]], tmp_path: Path
) -> None:
    ref_result, _ = reference
    run = RunFolder(tmp_path / "run")
    shutil.copytree(ref_result.run_dir, run.path)
    sidecar = json.loads((run.checkpoint_dir / "final.json").read_text(encoding="utf-8"))
    sidecar["meta"]["model"]["kwargs"]["num_classes"] = 5  # only the last layer changes shape
    (run.checkpoint_dir / "final.json").write_text(json.dumps(sidecar), encoding="utf-8")
    with pytest.raises(RunError) as info:
        load_run_model(run.path, "final", "cpu")
    assert str(info.value) == (
        f"checkpoint 'final' of {run.path} does not fit model 'small_cnn': 2 tensors differ: "
        "13.bias has shape (10,) in the checkpoint, (5,) in the model; "
        "13.parametrizations.weight.original has shape (10, 16) in the checkpoint, (5, 16) in the model"
    )
