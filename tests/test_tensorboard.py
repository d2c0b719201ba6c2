"""TensorBoard logging of a run (log.tensorboard): the tags, each step once after a resume, and the one-line
error when the tensorboard package is missing."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lipnet.cli import main
from lipnet.training.config import Config, ConfigError, load_config
from lipnet.training.run import train
from lipnet.training.runs import RunFolder

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

EPOCH_TAGS = ("epoch/loss", "epoch/train_acc", "epoch/test_acc", "epoch/lipschitz")
CERTIFIED_TAGS = ("epoch/certified_acc@36/255", "epoch/certified_acc@72/255")


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's event files (all of them, in the order TensorBoard reads them, purges
    applied): tag -> [(step, value)]."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_run_logs_steps_and_epochs(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", "log.tensorboard=true", "log.certify_n=16")
    result = train(cfg, progress=False)
    scalars = _scalars(result.run_dir)
    assert set(scalars) == {"step/loss", "step/lr", *EPOCH_TAGS, *CERTIFIED_TAGS}
    rows = RunFolder(result.run_dir).read_metrics()
    # 64 images in batches of 32, 2 epochs: steps 0..3, each once; lr follows the cosine schedule
    assert [s for s, _ in scalars["step/loss"]] == [0, 1, 2, 3]
    assert [s for s, _ in scalars["step/lr"]] == [0, 1, 2, 3]
    assert scalars["step/lr"][0][1] == pytest.approx(cfg.optim.lr)
    for epoch, row in enumerate(rows):
        # the epoch's mean loss is the mean of its two equal batches' losses
        batch_losses = [v for s, v in scalars["step/loss"] if 2 * epoch <= s < 2 * epoch + 2]
        assert sum(batch_losses) / 2 == pytest.approx(row["loss"], rel=1e-6)
    for tag in EPOCH_TAGS:
        key = tag.split("/")[1]
        assert scalars[tag] == [(row["step"], pytest.approx(row[key], rel=1e-6)) for row in rows], tag
    for tag in CERTIFIED_TAGS:
        assert [s for s, _ in scalars[tag]] == [2, 4] and all(0 <= v <= 1 for _, v in scalars[tag])
    # the last epoch's certified accuracy on those 16 images is that of the final certification's radii
    radii = RunFolder(result.run_dir).read_radii()["radii"][:16]
    labels = RunFolder(result.run_dir).read_radii()["labels"][:16]
    predictions = RunFolder(result.run_dir).read_radii()["predictions"][:16]
    for tag, eps in zip(CERTIFIED_TAGS, cfg.certify.eps, strict=True):
        expected = float(((radii > eps) & (predictions == labels)).double().mean())
        assert scalars[tag][-1][1] == pytest.approx(expected)


def test_resume_logs_every_step_once(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    """A process killed after epoch 1's checkpoint may have logged later steps (and, here, junk): the
    resumed run's curves hold each step once, with the values of the resumed training."""
    from torch.utils.tensorboard import SummaryWriter

    cfg = tiny_config(tmp_path / "run", "log.tensorboard=true", "log.certify_n=16", "optim.epochs=3")
    first = train(cfg, progress=False, stop_after_epoch=1)
    # what the killed process wrote after its checkpoint (steps 2 and 3 of epoch 2, its epoch row)
    with SummaryWriter(str(first.run_dir / "tensorboard")) as killed:
        for step in (2, 3):
            killed.add_scalar("step/loss", 999.0, step)
        killed.add_scalar("epoch/loss", 999.0, 4)
    train(cfg, resume=True, progress=False)
    scalars = _scalars(first.run_dir)
    assert [s for s, _ in scalars["step/loss"]] == list(range(6))
    assert all(v != 999.0 for _, v in scalars["step/loss"])
    rows = RunFolder(first.run_dir).read_metrics()
    for tag in (*EPOCH_TAGS, *CERTIFIED_TAGS):
        assert [s for s, _ in scalars[tag]] == [2, 4, 6], tag
    assert [v for _, v in scalars["epoch/loss"]] == [pytest.approx(r["loss"], rel=1e-6) for r in rows]


def test_missing_tensorboard_is_a_one_line_error(
    tiny_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    out = tmp_path / "out"
    argv = ["train", "--config", str(tiny_yaml), "--set", "log.tensorboard=true", "--out", str(out)]
    code = main([*argv, "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.splitlines() == [
        "lipnet train: error: log.tensorboard=true needs the tensorboard package: "
        "pip install 'lipnet[tensorboard]' (or set log.tensorboard=false)"
    ]
    assert not out.exists()


def test_log_section_is_validated() -> None:
    assert load_config(None, ["log.tensorboard=true", "log.certify_n=0"]).log.certify_n == 0
    with pytest.raises(ConfigError, match="log.certify_n"):
        load_config(None, ["log.certify_n=-1"])
    with pytest.raises(ConfigError, match="log.tensorboard"):
        load_config(None, ["log.tensorboard=maybe"])
