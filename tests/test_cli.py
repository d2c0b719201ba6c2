"""The ``lipnet`` command: train, sweep, certify and bench smoke tests; bad input exits 2 on one line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from lipnet.cli import main
from lipnet.training.config import Config, dump_config
from lipnet.training.runs import RunFolder


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory, tiny_config: Callable[..., Config]) -> Path:
    """The tiny config as YAML, cut to one epoch of one step."""
    cfg = tiny_config("unused", "optim.epochs=1", "data.n_train=32")
    cfg.out = None
    path = tmp_path_factory.mktemp("cli-config") / "tiny.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, config_file: Path) -> Path:
    """A run trained through ``lipnet train``."""
    out = tmp_path_factory.mktemp("cli-run") / "run"
    assert main(["train", "--config", str(config_file), "--out", str(out), "--quiet"]) == 0
    return out


def test_train_writes_a_run(trained: Path) -> None:
    run = RunFolder(trained)
    assert run.has_results() and run.has_checkpoint("final") and run.summary_path.is_file()
    assert run.read_config().optim.epochs == 1


def test_train_on_a_cifar10_folder(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fixtures import write_cifar10

    write_cifar10(tmp_path / "cifar", per_batch=8)
    out = tmp_path / "run"
    argv = ["train", "--config", str(config_file), "--out", str(out), "--quiet"]
    data = ["--set", "data.name=cifar10", "--set", f"data.data_dir={tmp_path / 'cifar'}"]
    code, _, err = _run([*argv, *data, "--set", "data.n_train=16", "--set", "data.n_test=8"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["certify"]["n"] == 8
    assert RunFolder(out).read_config().data.name == "cifar10"


def test_model_takes_its_input_shape_from_the_data(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """small_cnn defaults to 3x32x32 inputs; on 1x28x28 MNIST files it gets in_channels=1 and
    input_size=28 from the data (the config sets neither), and certify rebuilds the same model."""
    from fixtures import write_idx_dataset

    write_idx_dataset(tmp_path / "data" / "mnist", n_train=32, n_test=8, gz=False)
    out = tmp_path / "run"
    argv = ["train", "--config", str(config_file), "--out", str(out), "--quiet"]
    data = ["--set", "data.name=mnist", "--set", f"data.data_dir={tmp_path / 'data'}"]
    code, _, err = _run([*argv, *data, "--set", "data.n_train=32", "--set", "data.n_test=8"], capsys)
    assert code == 0, err
    run = RunFolder(out)
    assert "in_channels" not in run.read_config().model.kwargs  # config.yaml: what the user wrote
    kwargs = run.load_checkpoint("final").meta["model"]["kwargs"]
    assert kwargs["in_channels"] == 1 and kwargs["input_size"] == 28 and kwargs["num_classes"] == 10
    code, _, err = _run(["certify", str(out), "--quiet"], capsys)
    assert code == 0, err


def test_diverged_training_exits_1_with_the_lr_hint(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An absurd learning rate makes the logits NaN mid-epoch: that is divergence (exit 1, lower
    optim.lr), not bad input (exit 2, which the loss's own NaN check used to give)."""
    out = tmp_path / "run"
    lr = ["--set", "optim.lr=1e30", "--set", "optim.schedule=none", "--set", "optim.epochs=3"]
    code, _, err = _run(["train", "--config", str(config_file), "--out", str(out), "--quiet", *lr], capsys)
    assert code == 1, err
    _one_line_error(err)
    assert "NaN" in err and "lower optim.lr" in err
    assert not RunFolder(out).has_checkpoint("final")


def test_certify_a_run(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["certify", str(trained), "--eps", "36/255,0.5", "--n", "16", "--quiet"], capsys)
    assert code == 0, err
    assert "cert. ε=36/255" in out and "cert. ε=0.5" in out
    cert = json.loads((trained / "certify.json").read_text(encoding="utf-8"))
    assert cert["checkpoint"] == "final" and cert["n"] == 16 and cert["eps"] == [36 / 255, 0.5]
    code, out, err = _run(["certify", str(trained), "--quiet"], capsys)
    assert code == 0, err
    default = json.loads((trained / "certify.json").read_text(encoding="utf-8"))
    assert default["eps"] == [36 / 255, 72 / 255] and default["n"] == 32
    # the whole test set at the run's radii: the same numbers as the run's own certification
    assert default["certified_accuracy"] == RunFolder(trained).read_results()["certify"]["certified_accuracy"]


def test_resume_of_a_finished_run(
    trained: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(["train", "--resume", str(trained), "--quiet"], capsys)
    assert code == 0, err
    code, out, err = _run(
        ["train", "--resume", str(trained), "--config", str(config_file), "--quiet"], capsys
    )
    assert code == 0, err
    before = (trained / "config.yaml").read_bytes()
    code, out, err = _run(
        ["train", "--resume", str(trained), "--config", str(config_file), "--set", "loss.tau=3", "--quiet"],
        capsys,
    )
    assert code == 2
    _one_line_error(err)
    assert "loss.tau" in err
    assert (trained / "config.yaml").read_bytes() == before
    code, out, err = _run(["train", "--config", str(config_file), "--out", str(trained), "--quiet"], capsys)
    assert code == 2 and "already holds a run" in err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--set", "optim.momentun=0.9"], "unknown config key 'optim.momentun'"),
        (["--set", "loss.tau=0"], "loss.tau must be > 0"),
        (["--set", "loss.tau=-1"], "loss.tau must be > 0"),
        (["--set", "certify.eps=[72/255,36/255]"], "strictly increasing"),
        (["--set", "optim.epochs=0"], "optim.epochs"),
        (["--set", "model.name=bethune_vgg_does_not_exist"], "unknown model"),
        (["--set", "model.depth=3"], "depth"),
        (["--set", "data.name=no_such_data"], "no_such_data"),
        (["--set", "oops"], "section.key=value"),
        (["--device", "tpu"], "device must be"),
    ],
)
def test_bad_train_input_exits_2(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragment: str
) -> None:
    out = tmp_path / "never"
    code, _, err = _run(["train", "--config", str(config_file), "--out", str(out), "--quiet", *extra], capsys)
    assert code == 2
    _one_line_error(err)
    assert fragment in err
    assert not out.exists() or not any(out.iterdir())


def test_other_bad_input_exits_2(tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ["train", "--config", str(tmp_path / "missing.yaml")],
        ["train"],
        ["certify", str(tmp_path)],
        ["certify", str(trained), "--eps", "72/255,36/255"],
        ["certify", str(trained), "--eps", "a lot"],
        ["sweep", "--config", str(tmp_path / "missing.yaml"), "--taus", "1,2"],
        ["sweep", "--taus", "1,x"],
        ["sweep", "--taus", "1", "--margins", "2"],
        ["nonsense"],
        [],
    ]
    for argv in cases:
        code, _, err = _run(argv, capsys)
        assert code == 2, argv
        _one_line_error(err)


def test_corrupted_checkpoint_exits_2(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    (tensors,) = (copy / "checkpoints").glob("*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-10])
    code, _, err = _run(["certify", str(copy), "--quiet"], capsys)
    assert code == 2
    _one_line_error(err)
    assert "corrupted" in err


def test_sweep_command(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--config",
        str(config_file),
        "--taus",
        "2,20",
        "--out",
        str(out),
        "--attack-n",
        "4",
        "--quiet",
    ]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    for name in ("sweep.csv", "sweep.md", "curve.png", "runs/tau-2/results.json", "runs/tau-20/results.json"):
        assert (out / name).is_file(), name
    assert "| tau | clean |" in stdout
    rows = (out / "sweep.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and rows[0].startswith("tau,clean_acc,")
    code, _, err = _run([*argv[:-1], "--set", "optim.lr=0.5", "--quiet"], capsys)
    assert code == 2 and "optim.lr" in err


@pytest.mark.parametrize(
    ("loss", "flags", "param"),
    [
        (
            ["--set", "loss.name=poly1", "--set", "loss.epsilon=1"],
            ["--param", "epsilon", "--values", "0,2"],
            "epsilon",
        ),
        (["--set", "loss.name=focal", "--set", "loss.gamma=2"], ["--gammas", "0,2"], "gamma"),
    ],
)
def test_sweep_any_parameter_the_loss_declares(
    config_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    loss: list[str],
    flags: list[str],
    param: str,
) -> None:
    """``--param NAME --values ...`` or ``--NAMEs ...`` for any parameter a loss declares sweepable."""
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--config",
        str(config_file),
        *loss,
        *flags,
        "--attack-n",
        "0",
        "--out",
        str(out),
        "--quiet",
    ]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    rows = (out / "sweep.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and rows[0].startswith(f"{param},clean_acc,")
    assert f"| {param} | clean |" in stdout
    for value in ("0", "2"):
        assert RunFolder(out / "runs" / f"{param}-{value}").read_config().loss.kwargs[param] == float(value)


def test_sweep_param_goes_with_values_only(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["sweep", "--config", str(config_file), "--param", "tau", "--taus", "1,2"], capsys)
    assert code == 2 and out == ""
    _one_line_error(err)
    assert "--param names the parameter of --values" in err


def test_bench_layers_is_dispatched_lazily(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[argparse.Namespace] = []
    # the command's run, looked up when the parser is built: the parsed arguments reach it, and no
    # benchmark starts
    monkeypatch.setattr("lipnet.cli.bench.run_layers", lambda args: seen.append(args) or 0)
    code, _, err = _run(["bench", "layers", "--batch", "8", "--width", "16"], capsys)
    assert code == 0, err
    assert len(seen) == 1 and seen[0].batch == 8 and seen[0].width == 16
    code, _, err = _run(["bench"], capsys)
    assert code == 2
    _one_line_error(err)


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--help"], capsys)
    assert code == 0 and "train" in out and "sweep" in out and "certify" in out and "audit" in out
