"""Model specifications (certify.loading): safe formats load, unsafe or broken ones are refused clearly."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from certify.loading import CheckpointError, build_architecture, load_model, load_state_dict_file


def small_net(width: int = 4, classes: int = 3) -> nn.Module:
    """Architecture for the ``--arch test_loading:small_net`` specifications below."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


def not_a_module() -> int:
    return 3


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.rand(2, 1, 6, 6)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_state_dict_and_safetensors_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net(width=6).eval()
    pt, st, nested = tmp_path / "m.pt", tmp_path / "m.safetensors", tmp_path / "nested.pth"
    torch.save(model.state_dict(), pt)
    save_file(model.state_dict(), str(st))
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, nested)
    for path in (pt, st, nested):
        loaded = load_model(path, arch="test_loading:small_net", arch_kwargs={"width": 6})
        assert not loaded.model.training
        assert _same_outputs(loaded.model, model)
    assert load_model(st, arch="test_loading:small_net", arch_kwargs={"width": 6}).kind == "safetensors"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_file_and_module_specs(tmp_path: Path) -> None:
    model = small_net().eval()
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_model(path)
    assert loaded.kind == "torchscript" and _same_outputs(loaded.model, model)
    assert load_model(model).model is model
    with pytest.raises(CheckpointError, match="drop --arch"):
        load_model(path, arch="test_loading:small_net")


def test_pickled_model_is_refused_with_the_reason_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(small_net(), path)  # pickles the classes: loading it would run arbitrary code
    with pytest.raises(CheckpointError) as info:
        load_model(path, arch="test_loading:small_net")
    message = str(info.value)
    assert "unpickling arbitrary Python objects" in message
    assert "Python global torch.nn.modules.container.Sequential" in message  # names the offending global
    assert "add_safe_globals" not in message and "weights_only" not in message
    assert "state_dict" in message and "safetensors" in message


@pytest.mark.parametrize("protocol", [4, 5])
def test_raw_pickle_is_refused_in_our_words_without_torch_warnings(tmp_path: Path, protocol: int) -> None:
    import pickle

    path = tmp_path / "weights.pkl"
    with path.open("wb") as f:  # a plain pickle.dump, not torch.save: torch's reader cannot run it
        pickle.dump({"weight": torch.zeros(2)}, f, protocol=protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol" warning would fail here
        with pytest.raises(CheckpointError) as info:
            load_state_dict_file(path)
    message = str(info.value)
    assert "pickle opcode 149" in message and "pickle.dump" in message and "state_dict" in message
    # torch's own advice (file an issue, re-run with weights_only=False) is not passed on
    assert "file an issue" not in message.lower() and "weights_only" not in message
    assert "\n" not in message


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_checkpoint_with_code_is_never_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refuses"):
        load_state_dict_file(path)
    assert "this must never run" not in capsys.readouterr().out


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(small_net().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    bad_st = tmp_path / "broken.safetensors"
    bad_st.write_bytes(b"\x00\x01garbage")
    for path in (truncated, text, bad_st):
        with pytest.raises(CheckpointError, match="truncated|not a"):
            load_model(path, arch="test_loading:small_net")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt", arch="test_loading:small_net")


def test_checkpoint_that_does_not_fit_the_architecture(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(small_net(width=8).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit the architecture") as info:
        load_model(path, arch="test_loading:small_net")
    assert "size mismatch" in str(info.value)
    partial = tmp_path / "partial.pt"
    state = small_net().state_dict()
    state.pop("5.weight")
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match="Missing key"):
        load_model(partial, arch="test_loading:small_net")


def test_weights_without_architecture_and_bad_architectures(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(small_net().state_dict(), path)
    with pytest.raises(CheckpointError, match="--arch"):
        load_model(path)
    for arch, match in (
        ("test_loading.small_net", "package.module:function"),
        ("no_such_module_xyz:fn", "cannot import"),
        ("test_loading:missing", "no attribute"),
        ("test_loading:not_a_module", "not a torch.nn.Module"),
    ):
        with pytest.raises(CheckpointError, match=match):
            build_architecture(arch)
    with pytest.raises(CheckpointError, match="calling"):
        build_architecture("test_loading:small_net", {"depth": 3})
    not_weights = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_weights)
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        load_model(not_weights, arch="test_loading:small_net")


def test_lipnet_run_folder_is_loaded(tmp_path: Path, tiny_config) -> None:  # noqa: ANN001 (fixture factory)
    from lipnet.cli.audit import load_run_for_audit
    from lipnet.training.build import build_model
    from lipnet.training.runs import RunFolder

    cfg = tiny_config(tmp_path / "run")
    cfg.model.kwargs = {"width": 4, "in_channels": 3, "num_classes": 10, "input_size": 32}
    model = build_model(cfg.model).eval()
    run = RunFolder(tmp_path / "run")
    run.write_config(cfg)
    meta = {"model": {"name": cfg.model.name, "kwargs": cfg.model.kwargs}}
    run.save_checkpoint("final", epoch=1, step=1, model_state=model.state_dict(), state={}, meta=meta)
    loaded = load_model(tmp_path / "run", run_loader=load_run_for_audit)
    assert loaded.kind == "run" and loaded.input_shape == (3, 32, 32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out: Tensor = loaded.model(x)
        assert torch.allclose(out, model(x))
    with pytest.raises(CheckpointError, match="run folder"):
        load_model(tmp_path / "run", arch="test_loading:small_net", run_loader=load_run_for_audit)
    # certify reads files only: a folder needs the caller's loader (certify never imports lipnet)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_model(tmp_path / "run")
    with pytest.raises(CheckpointError, match="cannot load the lipnet run"):
        load_model(tmp_path, run_loader=load_run_for_audit)
