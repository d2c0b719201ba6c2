"""``lipnet.export_formats`` and ``lipnet export``: every family x kind x format, verified, certified again.

Each model family (tiny, two Adam steps from its initialisation, as in ``tests/test_export.py``) with
every layer kind it takes is written in each format; the file must load back with its own runtime,
compute the model's outputs within 1e-5, and certify must bound the exported graph as tightly as
the model (the op patterns of ``certify.graph.patterns`` recognise what the formats spell in small
operations). Then the regressions of issue 15: ONNX's L2-norm pooling (the exporter dropped
``divisor_override``), TorchScript of GroupSort (a custom autograd Function), the refusals, and the
command line.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_export import CASES, FAMILIES, _trained
from torch import nn

from lipnet.activations import GroupSort, MaxMin
from lipnet.cli import main
from lipnet.export_formats import (
    FORMATS,
    ExportError,
    ExportMismatchError,
    circular_conv_of,
    export_file,
    load_exported,
    portable,
)
from lipnet.layers import CayleyConv2d
from lipnet.models.small import small_cnn
from lipnet.pooling import GlobalL2NormPool2d, ScaledL2NormPool2d
from lipnet.training.config import Config


def _needs(fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="the onnx extra is not installed")
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


def _model(family: str, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    build, shape, _ = FAMILIES[family]
    torch.manual_seed(0)
    return _trained(build(kind), shape), shape


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_every_family_and_kind_exports_to_every_format(
    family: str, kind: str, fmt: str, tmp_path: Path
) -> None:
    _needs(fmt)
    model, shape = _model(family, kind)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((8, *shape), generator=gen)
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # labels the model gets right, so that radii are positive
    path = tmp_path / f"model.{fmt}"
    report = export_file(model, path, fmt, x, y)
    assert path.is_file() and report.bytes == path.stat().st_size
    assert report.max_difference <= 1e-5
    # the file as its runtime reads it computes the model on other inputs too
    loaded = load_exported(path, fmt)
    probe = torch.rand((3, *shape), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).float(), model(probe), rtol=0, atol=1e-5)
    # certify bounds the exported graph as tightly as the model: the same bound, the same radii
    assert report.export_rule == report.model_rule
    assert report.export_bound == pytest.approx(report.model_bound, rel=1e-6)
    assert report.radius_ratio == pytest.approx(1.0, abs=1e-3)


def test_onnx_l2_norm_pooling_computes_window_norms() -> None:
    """torch.onnx.export dropped ``divisor_override``: onnxruntime returned half the pooled norms."""
    _needs("onnx")
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), ScaledL2NormPool2d(2), GlobalL2NormPool2d()).eval()
    x = torch.rand(4, 2, 8, 8)
    from certify.onnx import run_onnxruntime
    from lipnet.export_formats import _serialise

    got = run_onnxruntime(_serialise(model, "onnx", x[:2]), x)
    torch.testing.assert_close(got, model(x).detach(), rtol=0, atol=1e-6)


def test_group_sort_models_save_with_jit_script_and_trace(tmp_path: Path) -> None:
    """The former custom autograd Function made torch.jit.trace + save fail and script too."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), MaxMin(), nn.Flatten(), nn.Linear(64, 4), GroupSort(2)
    ).eval()
    x = torch.randn(2, 1, 4, 4)
    for how in (torch.jit.script, lambda m: torch.jit.trace(m, x)):
        path = tmp_path / "model.ts"
        torch.jit.save(how(model), str(path))
        assert torch.equal(torch.jit.load(str(path))(x), model(x))


def test_cayley_becomes_an_exact_circular_convolution() -> None:
    torch.manual_seed(0)
    for stride, size in ((1, 4), (1, 5), (2, 6)):
        layer = CayleyConv2d(2 * stride, 4, 3, stride=stride, input_size=size).eval()
        frozen = layer.export().double()  # float64 throughout: the impulse response is exact to rounding
        conv = circular_conv_of(frozen)
        x = torch.randn(3, 2 * stride, size, size, dtype=torch.float64)
        torch.testing.assert_close(conv(x), frozen(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_that_does_not_compute_the_model_is_refused_and_nothing_is_written(
    fmt: str, tmp_path: Path
) -> None:
    _needs(fmt)
    model, shape = _model("SmallCNN", "aol")
    x = torch.rand(4, *shape)
    path = tmp_path / f"model.{fmt}"
    drifting = _Drifting(model).train()
    with pytest.raises(ExportMismatchError, match="differs from the model by up to 0.001"):
        export_file(drifting, path, fmt, x, torch.zeros(4, dtype=torch.long))
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file left behind
    assert all(m.training for m in drifting.modules())  # the model's modes are restored


class _Drifting(nn.Module):
    """A model whose own export (the wrapped network) computes its logits minus 1e-3."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 1e-3

    def export(self) -> nn.Module:
        return self.inner


def test_bad_verification_data_and_formats_are_refused(tmp_path: Path) -> None:
    model, shape = _model("SmallCNN", "bjorck")
    x = torch.rand(4, *shape)
    y = torch.zeros(4, dtype=torch.long)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: export_file(model, tmp_path / "m", "tflite", x, y), "unknown export format"),
        (lambda: export_file(model, tmp_path / "m", "pt2", x[:0], y[:0]), "non-empty"),
        (lambda: export_file(model, tmp_path / "m", "pt2", x * float("nan"), y), "NaN"),
        (lambda: export_file(model, tmp_path / "m", "pt2", x, y[:2]), "labels"),
    ]
    for call, fragment in cases:
        with pytest.raises(ExportError, match=fragment):
            call()
    assert list(tmp_path.iterdir()) == []


def test_torch_files_load_only_torch_and_lipnet_module_classes(tmp_path: Path) -> None:
    model = portable(_model("SmallCNN", "aol")[0])
    buf = io.BytesIO()
    torch.save(model, buf)
    assert isinstance(load_exported(buf.getvalue(), "torch"), nn.Module)
    buf = io.BytesIO()
    torch.save(nn.Sequential(_Foreign()), buf)
    with pytest.raises(ExportError, match="not a torch.nn or lipnet class"):
        load_exported(buf.getvalue(), "torch")


class _Foreign(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_cli_exports_a_run_and_refuses_on_one_line(
    tmp_path: Path, tiny_config: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    from lipnet.training.run import train

    run = tmp_path / "run"
    train(tiny_config(run, "optim.epochs=1", "data.n_train=32", "data.n_test=16"), progress=False)
    for fmt in ("pt2", "onnx") if _has_onnx() else ("pt2",):
        out = tmp_path / f"model.{fmt}"
        assert main(["export", str(run), "--format", fmt, "--out", str(out), "--n", "8"]) == 0
        printed = capsys.readouterr().out
        assert out.is_file() and f"exported {fmt}" in printed and "max |exported - model|" in printed
    # a weights file with its architecture, verified on --data
    weights = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(small_cnn(width=4, conv="aol").state_dict(), weights)
    argv = ["export", str(weights), "--arch", "lipnet.models.small:small_cnn", "--arch-kwargs"]
    argv += ['{"width": 4, "conv": "aol"}', "--data", "shapes10", "--format", "torchscript"]
    assert main([*argv, "--out", str(tmp_path / "weights.ts"), "--n", "8"]) == 0
    assert "exported torchscript" in capsys.readouterr().out and (tmp_path / "weights.ts").is_file()
    if _has_onnx():  # onnxruntime's float rounding differs from torch's (by about 1e-8 here)
        refused = tmp_path / "refused.onnx"
        argv = [
            "export",
            str(run),
            "--format",
            "onnx",
            "--out",
            str(refused),
            "--n",
            "8",
            "--tolerance",
            "1e-30",
        ]
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 1 and out == "" and len(err.splitlines()) == 1
        assert err.startswith("lipnet export: error: ") and "nothing written" in err
        assert not refused.exists()


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
