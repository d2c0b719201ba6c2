"""The contract of every ``lipnet`` command for bad input.

Each bad argument ends in exit code 2 and exactly one line on stderr, ``lipnet <command>: error: ...``
(argparse's usage errors too), no traceback, nothing on stdout, and no file or folder created. It is
rejected before any data is generated or any model trained: both raise :class:`_Forbidden` during
these tests, which no ``except`` clause of the command catches.

The commands are enumerated from the parser, so a new command fails
:func:`test_every_command_has_bad_input_cases` until it gets its cases here; its options with a type
get the type's bad values automatically (:data:`BAD_VALUES`), and an option whose type has no bad
values listed (a bare ``int`` or ``float``, which accepts 0 and -5) fails
:func:`test_every_typed_option_declares_its_range`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lipnet.cli import build_parser, main
from lipnet.cli.argtypes import (
    autoattack_list,
    eps_list,
    float_list,
    increasing_eps_list,
    json_object,
    name_list,
    non_negative_int,
    positive_float,
    positive_float_list,
    positive_int,
    seed_list,
    unit_fraction,
)
from lipnet.training.config import Config, dump_config

#: Values that each argument type must refuse.
BAD_VALUES: dict[Callable[[str], object], tuple[str, ...]] = {
    positive_int: ("abc", "1.5", "0", "-5"),
    non_negative_int: ("abc", "1.5", "-1"),
    positive_float: ("abc", "0", "-1", "nan", "inf"),
    positive_float_list: ("abc", "0.5,0", "-1", "nan", "5,inf", ","),
    float_list: ("1,x", ","),
    eps_list: ("x", "-1", "1/0", "nan", ","),
    increasing_eps_list: ("x", "-1", "72/255,36/255", "0.1,0.1"),
    name_list: (",",),
    json_object: ("{", "[1]"),
    autoattack_list: ("bogus", "apgd-ce,nope"),
    seed_list: ("x", "-1", "1.5", ",", "0,0"),
    unit_fraction: ("abc", "-0.1", "1.5", "nan"),
}


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every leaf command (``("bench", "layers")``, ...) and its sub-parser."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, (*prefix, name)) or {(*prefix, name): sub})
    return found


COMMANDS = _commands(build_parser())


class _Forbidden(BaseException):
    """Raised by data generation and training during these tests: bad input must stop before them."""


# ---------------------------------------------------------------------------------------------
# fixtures: a finished run and the broken things built from it


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_config: Callable[..., Config]) -> dict[str, Path]:
    """A trained run, its broken copies, and other bad files, in a folder outside the working folder."""
    from lipnet.training.run import train

    root = tmp_path_factory.mktemp("cli-errors")
    run = root / "run"
    train(tiny_config(run, "optim.epochs=1", "data.n_train=32", "data.n_test=16"), progress=False)
    config = root / "tiny.yaml"
    cfg = tiny_config(root / "unused", "optim.epochs=1")
    cfg.out = None
    config.write_text(dump_config(cfg), encoding="utf-8")
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("model: [1,\n", encoding="utf-8")
    list_yaml = root / "list.yaml"
    list_yaml.write_text("- 1\n- 2\n", encoding="utf-8")
    bad_config_run = root / "bad-config-run"
    shutil.copytree(run, bad_config_run)
    (bad_config_run / "config.yaml").write_text("model: {name: [\n", encoding="utf-8")
    bad_ckpt_run = root / "bad-checkpoint-run"
    shutil.copytree(run, bad_ckpt_run)
    for tensors in (bad_ckpt_run / "checkpoints").glob("*.safetensors"):
        tensors.write_bytes(tensors.read_bytes()[:-10])
    empty = root / "empty"
    empty.mkdir()
    a_file = root / "a-file.txt"
    a_file.write_text("not a folder", encoding="utf-8")
    raw_pickle = root / "weights.pkl"
    with raw_pickle.open("wb") as f:
        pickle.dump({"weight": torch.zeros(2)}, f, protocol=4)
    weights = root / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), weights)
    bad_catalogue = root / "bad-catalogue"
    bad_catalogue.mkdir()
    (bad_catalogue / "catalogue.csv").write_text("not,a\ncatalogue\n", encoding="utf-8")
    return {
        "run": run,
        "config": config,
        "bad_yaml": bad_yaml,
        "list_yaml": list_yaml,
        "bad_config_run": bad_config_run,
        "bad_ckpt_run": bad_ckpt_run,
        "empty": empty,
        "missing": root / "missing",
        "file": a_file,
        "raw_pickle": raw_pickle,
        "weights": weights,
        "bad_catalogue": bad_catalogue,
    }


#: The smallest arguments that parse, per command; the bad argument under test comes after them.
#: ``{name}`` is a path of :func:`files`.
BASE: dict[tuple[str, ...], tuple[str, ...]] = {
    ("train",): ("--config", "{config}", "--out", "out", "--quiet"),
    ("sweep",): ("--config", "{config}", "--out", "out", "--quiet"),
    ("certify",): ("{run}", "--quiet"),
    ("audit",): ("--model", "{run}", "--data", "shapes10", "--out", "out", "--quiet"),
    ("export",): ("{run}", "--format", "torch", "--out", "out.pt"),
    ("catalogue",): ("--out", "out", "--quiet"),
    ("bench", "layers"): ("--out", "out.md"),
    ("bench", "fmnist"): ("--out", "out", "--quiet"),
    ("bench", "seeds"): ("{empty}", "{run}"),
    ("bench", "recipe"): ("--config", "{config}", "--out", "out", "--quiet"),
    ("bench", "models"): ("--out", "out.md"),
    ("bench", "kernels"): ("--out", "out.md"),
}

#: Bad input beyond a single option's type, per command: (arguments after the base, a fragment of the
#: message). An argument list starting with "!" replaces the base.
CASES: dict[tuple[str, ...], list[tuple[tuple[str, ...], str]]] = {
    ("train",): [
        (("!", "--out", "out"), "give --config"),
        (("!", "--config", "{missing}"), "does not exist"),
        (("!", "--config", "{bad_yaml}"), "not valid YAML"),
        (("!", "--config", "{list_yaml}"), "mapping of sections"),
        (("--set", "model.width=abc"), "model.width"),
        (("--set", "model.depth=3"), "model.depth"),
        (("--set", "model.name=no_such_model"), "unknown model"),
        (("--set", "loss.name=no_such_loss"), "unknown loss"),
        (("--set", "loss.tau=0"), "loss.tau"),
        (("--set", "optim.lr=abc"), "optim.lr"),
        (("--set", "optim.lr=1e38"), "optim.lr"),
        (("--set", "optim.epochs=0"), "optim.epochs"),
        (("--set", "optim.momentun=0.9"), "optim.momentun"),
        (("--set", "certify.eps=abc"), "certify.eps"),
        (("--set", "certify.eps=[72/255, 36/255]"), "certify.eps"),
        (("--set", "log.tensorboard=maybe"), "log.tensorboard"),
        (("--set", "log.certify_n=-1"), "log.certify_n"),
        (("--set", "optim.ema=1.5"), "optim.ema"),
        (("--set", "loss.label_smoothing=-1"), "label_smoothing"),
        (("--set", "model.head=softmax"), "head"),
        (("--set", "data.name=no_such_data"), "no_such_data"),
        (("--set", "data.name=cifar10", "--set", "data.data_dir={empty}"), "data.download=true"),
        (("--set", "oops"), "section.key=value"),
        (("--device", "tpu"), "device"),
        (("--out", "{file}"), "--out"),
        (("--out", "{run}"), "already holds a run"),
        (("!", "--resume", "{missing}"), "not a run folder"),
        (("!", "--resume", "{empty}"), "not a run folder"),
        (("!", "--resume", "{bad_config_run}"), "unreadable"),
        (("!", "--resume", "{run}", "--set", "model.width=abc"), "model.width"),
        (("!", "--resume", "{run}", "--config", "{config}", "--set", "loss.tau=3"), "loss.tau"),
    ],
    ("sweep",): [
        (("!", "--taus", "1,2"), "give --config"),
        (("!", "--config", "{missing}", "--taus", "1,2"), "does not exist"),
        (("--taus", "0"), "loss.tau"),
        (("--taus", "1,1"), "tau"),
        (("--margins", "-1"), "loss.margin"),
        (("--alphas", "2"), "loss.alpha"),
        (("--taus", "1", "--margins", "2"), "not allowed with"),
        (("--set", "model.width=abc", "--taus", "1"), "model.width"),
        (("--set", "loss.name=no_such_loss", "--taus", "1"), "unknown loss"),
        (("--out", "{file}", "--taus", "1"), "--out"),
        (("--taus", "1", "--jobs", "0"), "--jobs"),
    ],
    ("certify",): [
        (("!", "{missing}"), "not a run folder"),
        (("!", "{empty}"), "not a run folder"),
        (("!", "{bad_config_run}"), "unreadable"),
        (("!", "{bad_ckpt_run}"), "corrupted"),
        (("--device", "tpu"), "device"),
        (("--set", "x=1"), "unrecognized arguments"),
    ],
    ("audit",): [
        (("!", "--data", "shapes10", "--out", "out"), "--model"),
        (("!", "--model", "{missing}", "--data", "shapes10", "--out", "out"), "not found"),
        (("!", "--model", "{raw_pickle}", "--data", "shapes10", "--out", "out"), "pickle"),
        (("!", "--model", "{weights}", "--data", "shapes10", "--out", "out"), "--arch"),
        (
            (
                "!",
                "--model",
                "{weights}",
                "--arch",
                "no_such_module_xyz:fn",
                "--data",
                "shapes10",
                "--out",
                "out",
            ),
            "cannot import",
        ),
        (("!", "--model", "{bad_ckpt_run}", "--data", "shapes10", "--out", "out"), "corrupted"),
        (("!", "--model", "{bad_config_run}", "--data", "shapes10", "--out", "out"), "unreadable"),
        (("--arch", "torch.nn:Linear"), "--arch"),
        (("--mean", "0.5"), "--mean"),
        (("--mean", "0.5,0.5,0.5", "--std", "0.2,0,0.2"), "std"),
        (("--device", "tpu"), "device"),
        (("--out", "{file}"), "--out"),
        (("--data", "cifar10", "--data-dir", "{empty}"), "data.download=true"),
    ],
    ("export",): [
        (("!", "--format", "torch", "--out", "out.pt"), "RUN|MODEL"),
        (("!", "{run}", "--out", "out.pt"), "--format"),
        (("!", "{missing}", "--format", "onnx", "--out", "out.onnx"), "not found"),
        (("!", "{empty}", "--format", "onnx", "--out", "out.onnx"), "run"),
        (("!", "{bad_ckpt_run}", "--format", "pt2", "--out", "out.pt2"), "corrupted"),
        (("!", "{bad_config_run}", "--format", "pt2", "--out", "out.pt2"), "unreadable"),
        (("!", "{raw_pickle}", "--format", "torch", "--out", "out.pt"), "pickle"),
        (("!", "{weights}", "--format", "torch", "--out", "out.pt"), "--arch"),
        (
            (
                "!",
                "{weights}",
                "--arch",
                "torch.nn:Linear",
                "--arch-kwargs",
                '{{"in_features": 2, "out_features": 2}}',  # braces doubled: the arguments are format strings
                "--format",
                "torch",
                "--out",
                "out.pt",
            ),
            "give --data",
        ),
        (("--arch", "torch.nn:Linear"), "--arch"),
        (("--device", "tpu"), "device"),
        (("--out", "{empty}"), "--out"),
        (("--out", "{file}/model.pt"), "--out"),
        (("--data", "cifar10", "--data-dir", "{empty}"), "data.download=true"),
    ],
    ("catalogue",): [
        (("--methods", "NoSuchAttention"), "NoSuchAttention"),
        (("--tasks", "no_such_task"), "no_such_task"),
        (("--width", "3"), "width"),
        (("--out", "{file}"), "--out"),
        (("!", "--out", "{bad_catalogue}"), "catalogue.csv"),
    ],
    ("bench", "layers"): [
        (("--kinds", "no_such_kind"), "no_such_kind"),
        (("--modes", "eager,no_such_mode"), "no_such_mode"),
        (("--networks", "plain,no_such_network"), "no_such_network"),
        (("--device", "tpu"), "device"),
        (("--out", "{empty}"), "--out"),
        (("--out", "{file}/table.md"), "--out"),
    ],
    ("bench", "kernels"): [
        (("--networks", "no_such_network"), "no_such_network"),
        (("--kinds", "no_such_kind"), "no_such_kind"),
        (("--width", "3"), "width"),
        (("--out", "{empty}"), "--out"),
    ],
    ("bench", "recipe"): [
        (("!", "--out", "out"), "give --config"),
        (("--ablations", "no_such_element"), "no_such_element"),
        (("--ablations", "ema,ema"), "repeat"),
        (("--ablations", "blocks"), "blocks"),
        (("--ablations", "optim.lr=0"), "optim.lr"),
        (("--ablations", "loss.label_smoothing=2"), "label_smoothing"),
        (("--set", "optim.warmup=1"), "optim.warmup"),
        (("--device", "tpu"), "device"),
        (("--out", "{file}"), "--out"),
    ],
    ("bench", "fmnist"): [
        (("--models", "lipnet:no_such_kind"), "no_such_kind"),
        (("--tau", "5", "--taus", "0.5,5"), "--taus"),
        (("--taus", "5,0.5,5"), "taus repeat"),
        (("--seeds", "3"), "at least two seeds"),
        (("--seed", "1", "--seeds", "0,1"), "not both"),
        (("--seeds", "0,1", "--models", "lipnet:no_such_kind"), "no_such_kind"),
        (("--set", "optim.lr=1e-3"), "--config"),
        (("--config", "{config}"), "model.name"),
        (("--config", "{config}", "--size", "m"), "--size"),
        (("--device", "tpu"), "device"),
        (("--out", "{file}"), "--out"),
    ],
    ("bench", "seeds"): [
        (("!", "{empty}"), "at least two run folders"),
        ((), "no setup.json"),
        (("!", "{missing}", "{empty}"), "no setup.json"),
        (("--out", "{empty}"), "--out"),
        (("--out", "{file}/table.md"), "--out"),
    ],
    ("bench", "models"): [
        (("--model", "no_such_model"), "no_such_model"),
        (("--kinds", "no_such_kind"), "no_such_kind"),
        (("--eval-only", "--models", "no_such_model"), "no_such_model"),
        (("--modes", "no_such_mode"), "no_such_mode"),
        (("--device", "tpu"), "device"),
        (("--out", "{empty}"), "--out"),
    ],
}


def _option_cases() -> Iterator[tuple[tuple[str, ...], tuple[str, ...], str]]:
    """(command, bad arguments, the flag the message must name) for every typed or choice option."""
    for cmd, sub in COMMANDS.items():
        for action in sub._actions:
            if not action.option_strings:
                continue
            flag = action.option_strings[0]
            bad = list(BAD_VALUES.get(action.type, ())) if action.type is not None else []
            if action.choices is not None:
                bad.append("no_such_choice")
            for value in bad:
                yield cmd, (flag, value), "/".join(action.option_strings)


def _expand(args: tuple[str, ...], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in args]


def _tree(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty working folder and data folder; generating data or training raises _Forbidden."""

    def forbidden(what: str) -> Callable[..., None]:
        def fail(*_args: object, **_kwargs: object) -> None:
            raise _Forbidden(f"bad input reached {what}")

        return fail

    monkeypatch.setattr("lipnet.data.shapes.generate_shapes10", forbidden("data generation"))
    monkeypatch.setattr(torch.Tensor, "backward", forbidden("training (backward)"))
    monkeypatch.setattr(torch.autograd, "backward", forbidden("training (autograd.backward)"))
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("LIPNET_DATA", str(data))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _check_refused(
    cmd: tuple[str, ...],
    argv: list[str],
    fragment: str,
    capsys: pytest.CaptureFixture[str],
    roots: tuple[Path, ...],
) -> None:
    before = _tree(*roots)
    code = main([*cmd, *argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1 and err.endswith("\n"), (argv, err)
    assert lines[0].startswith(f"lipnet {' '.join(cmd)}: error: "), (argv, err)
    assert fragment in lines[0], (argv, fragment, err)
    assert out == "" and "Traceback" not in err, (argv, out)
    assert _tree(*roots) == before, (argv, sorted(map(str, _tree(*roots) - before)))


def test_the_guard_stops_real_work(files: dict[str, Path], guarded: Path) -> None:
    """Without this, a case that reached data generation or training would pass unnoticed."""
    with pytest.raises(_Forbidden):
        main(["train", *_expand(BASE[("train",)], files)])


def test_every_command_has_bad_input_cases() -> None:
    assert set(COMMANDS) == set(BASE) == set(CASES)
    assert len(COMMANDS) >= 10  # train, sweep, certify, audit, export, catalogue, bench layers|fmnist|seeds|
    # recipe|models|kernels


def test_every_typed_option_declares_its_range() -> None:
    """A bare int or float type accepts 0, -5 or nan without a word; each typed option uses an argtypes
    type with bad values in BAD_VALUES (so its refusals are tested below)."""
    untested = [
        f"lipnet {' '.join(cmd)} {action.option_strings[0]} ({getattr(action.type, '__name__', action.type)})"
        for cmd, sub in COMMANDS.items()
        for action in sub._actions
        if action.type is not None and action.type not in BAD_VALUES
    ]
    assert not untested


@pytest.mark.parametrize(
    ("cmd", "bad", "flag"), list(_option_cases()), ids=lambda v: " ".join(v) if isinstance(v, tuple) else v
)
def test_a_bad_option_value_is_refused_naming_the_option(
    cmd: tuple[str, ...],
    bad: tuple[str, ...],
    flag: str,
    files: dict[str, Path],
    guarded: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = _expand(BASE[cmd], files) + list(bad)
    _check_refused(cmd, argv, f"argument {flag}: ", capsys, (guarded, files["run"].parent))


@pytest.mark.parametrize(
    ("cmd", "args", "fragment"),
    [(cmd, args, fragment) for cmd, cases in CASES.items() for args, fragment in cases],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v,
)
def test_bad_input_is_refused_on_one_line_before_any_work(
    cmd: tuple[str, ...],
    args: tuple[str, ...],
    fragment: str,
    files: dict[str, Path],
    guarded: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = _expand(args[1:], files) if args[:1] == ("!",) else _expand(BASE[cmd] + args, files)
    _check_refused(cmd, argv, fragment, capsys, (guarded, files["run"].parent))


@pytest.mark.parametrize("argv", [[], ["no_such_command"], ["bench"], ["bench", "no_such_bench"]])
def test_a_missing_or_unknown_command_is_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(argv)
    out, err = capsys.readouterr()
    prog = "lipnet bench" if argv[:1] == ["bench"] else "lipnet"
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--version"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert out.strip() == f"lipnet {importlib.metadata.version('lipnet')}"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"widths": [16, "a", 64]}, "model.widths: bethune_vgg expects Sequence[int]"),
        ({"widths": 16}, "model.widths"),
        ({"depths": [2, 2.5, 3]}, "model.depths"),
        ({"conv": 3}, "model.conv"),
        ({"input_size": True}, "model.input_size"),
        ({"depth": 3}, "has no argument 'depth'"),
    ],
)
def test_model_arguments_are_checked_against_the_constructor(
    kwargs: dict[str, object], fragment: str
) -> None:
    from lipnet.training.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match=re.escape(fragment)):
        ModelConfig("bethune_vgg", kwargs).check()
    ModelConfig("bethune_vgg", {"widths": [16, 32, 64], "depths": (1, 1, 1), "conv": "aol"}).check()


def test_data_arguments_are_filled_in_only_where_missing_and_accepted() -> None:
    from lipnet.training.config import ModelConfig

    spec = ModelConfig("small_cnn", {"width": 4, "input_size": 32})
    filled = spec.for_data((1, 28, 28), 10)
    assert filled.kwargs == {"width": 4, "input_size": 32, "in_channels": 1, "num_classes": 10}
    assert spec.kwargs == {"width": 4, "input_size": 32}  # the config itself is left as written
    assert "input_size" not in ModelConfig("small_cnn").for_data((3, 32, 16), 10).kwargs  # not square
