"""The audit reads what users have (issue 15): TorchScript of deel-torchlip and orthogonium models,
``torch.export`` programs, ONNX files, weights with an architecture from the current folder; errors are
one short line; the report puts each third-party layer's claimed constant next to certify's bound and
flags the claims not met.
"""

from __future__ import annotations

import io
import json
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from certify.audit import audit
from certify.bounds import lipschitz_bound
from certify.graph import analyze
from certify.io import CheckpointError
from certify.loading import load_model
from lipnet.activations import MaxMin
from lipnet.cli import main
from lipnet.export_formats import _serialise
from lipnet.pooling import ScaledL2NormPool2d

deel = pytest.importorskip("deel.torchlip", reason="deel-torchlip is a dependency of lipnet")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), MaxMin(), ScaledL2NormPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    ).eval()


def _data(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand((n, 1, 4, 4), generator=gen), torch.randint(0, 3, (n,), generator=gen))]


def _write(model: nn.Module, fmt: str, path: Path) -> Path:
    path.write_bytes(_serialise(model, fmt, torch.rand(2, 1, 4, 4)))
    return path


@pytest.mark.parametrize(("fmt", "kind"), [("torchscript", "torchscript"), ("pt2", "pt2"), ("onnx", "onnx")])
def test_exported_files_are_audited_with_the_model_bound(fmt: str, kind: str, tmp_path: Path) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    model = _net()
    loaded = load_model(_write(model, fmt, tmp_path / f"model.{fmt}"))
    assert loaded.kind == kind and loaded.input_shape in (None, (1, 4, 4))
    report = audit(loaded.model, _data(), attack="pgd", n_attack=4, pgd_steps=5, progress=False)
    assert report.passed
    assert report.lipschitz == pytest.approx(lipschitz_bound(model, (1, 4, 4)), rel=1e-6)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_a_pt2_archive_with_an_unsafe_pickle_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.export.load falls back to full unpickling; certify checks every pickle first."""
    good = _write(_net(), "pt2", tmp_path / "good.pt2")
    evil = tmp_path / "evil.pt2"
    payload = io.BytesIO()
    torch.save({"x": _Payload()}, payload)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(
                item, payload.getvalue() if item.filename.endswith("sample_inputs/model.pt") else data
            )
    with pytest.raises(CheckpointError, match="arbitrary Python objects"):
        load_model(evil)
    assert "this must never run" not in capsys.readouterr().out
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="not a loadable torch.export program"):
        load_model(truncated)


def test_onnx_files_refused_in_one_short_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from onnx import TensorProto, helper

    from certify.onnx import OPS

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(_write(_net(), "onnx", tmp_path / "m.onnx").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a valid ONNX model"):
        load_model(truncated)
    # 17 operations certify does not convert: counted, the first three named, one short line
    nodes = [
        helper.make_node(op, [f"v{i}"], [f"v{i + 1}"])
        for i, op in enumerate(["Sin", "Cos", "Atan"] * 5 + ["Sinh", "Cosh"])
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [helper.make_tensor_value_info("v0", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("v17", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "unsupported.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert "5 unsupported operations, first 3: Sin (x5), Cos (x5), Atan (x5)" in message
    # a conversion that does not compute what onnxruntime computes is refused
    monkeypatch.setitem(OPS, "Relu", OPS["Abs"])
    relu = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    bad = tmp_path / "relu.onnx"
    bad.write_bytes(_serialise(relu, "onnx", torch.rand(2, 4)))
    with pytest.raises(CheckpointError, match="differs from onnxruntime"):
        load_model(bad)


def test_arch_is_imported_from_the_current_folder_and_the_error_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mydeel_issue15.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))\n",
        encoding="utf-8",
    )
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    loaded = load_model("w.pt", arch="mydeel_issue15:build")
    assert loaded.kind == "state_dict"
    assert str(tmp_path) not in sys.path  # the current folder is searched, not left on the path
    monkeypatch.delitem(sys.modules, "mydeel_issue15")
    code = main(
        ["audit", "--model", "w.pt", "--arch", "nowhere_issue15:build", "--data", "shapes10", "--out", "a"]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "looked in the current folder" in err and str(tmp_path) in err


def _deel_model(with_centering: bool) -> nn.Module:
    from deel.torchlip.modules.normalization import BatchCentering

    tl = deel
    torch.manual_seed(0)
    layers = [tl.SpectralConv2d(1, 4, 3, padding=1), tl.GroupSort2(), tl.ScaledL2NormPool2d(2)]
    layers += (
        [BatchCentering(4)] if with_centering else [tl.SpectralConv2d(4, 4, 3, padding=1), tl.FullSort()]
    )
    model = tl.Sequential(
        *layers, nn.Flatten(), tl.SpectralLinear(16, 8), tl.GroupSort2(), tl.FrobeniusLinear(8, 3)
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 1, 4, 4))
    return model.eval()


@pytest.mark.parametrize("with_centering", [False, True])
def test_deel_torchlip_torchscript_files_are_bounded_like_the_modules(
    with_centering: bool, tmp_path: Path
) -> None:
    """vanilla_export() turns ScaledL2NormPool2d into nn.LPPool2d; BatchCentering keeps a running-mean buffer
    (its module cannot be scripted, so it is traced)."""
    vanilla = _deel_model(with_centering).vanilla_export().eval()
    path = tmp_path / "deel.pt"
    x = torch.rand(2, 1, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the trace check compares two traces, whose mangled class names differ: checked below by the bound
        saved = (
            torch.jit.trace(vanilla, x, check_trace=False) if with_centering else torch.jit.script(vanilla)
        )
        torch.jit.save(saved, str(path))
    loaded = load_model(path)
    bound = analyze(loaded.model, (1, 4, 4)).bound
    assert bound == pytest.approx(lipschitz_bound(vanilla, (1, 4, 4)), rel=1e-6)


def test_orthogonium_torchscript_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A traced orthogonium model: its AOC convolutions (circular padding) are bounded exactly; its
    HouseHolder activation (selections by input-dependent masks) is refused in one short line."""
    from orthogonium.layers import AdaptiveOrthoConv2d, OrthoLinear
    from orthogonium.layers.custom_activations import HouseHolder

    torch.manual_seed(0)
    conv = AdaptiveOrthoConv2d(3, 4, 3, padding="same", padding_mode="circular")
    plain = nn.Sequential(conv, nn.Flatten(), OrthoLinear(4 * 32 * 32, 10)).eval()
    path = tmp_path / "orthogonium.pt"
    x = torch.rand(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(plain, x), str(path))
        bound = analyze(load_model(path).model, (3, 32, 32)).bound
        assert bound == pytest.approx(lipschitz_bound(plain, (3, 32, 32)), rel=1e-6)
        with_householder = nn.Sequential(conv, HouseHolder(4), *plain[1:]).eval()
        torch.jit.save(torch.jit.trace(with_householder, x), str(path))
    argv = ["audit", "--model", str(path), "--data", "shapes10", "--data-dir", str(tmp_path / "data")]
    argv += ["--n", "4", "--attack", "none", "--out", str(tmp_path / "audit"), "--quiet"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and len(err) < 1500, err
    assert "unsupported operation(s), first 3:" in err and "also" in err


def test_the_report_puts_third_party_claims_next_to_certify_bounds(tmp_path: Path) -> None:
    tl = deel
    torch.manual_seed(0)
    reflect = tl.SpectralConv2d(1, 1, 3, padding=1, padding_mode="reflect")
    with torch.no_grad():
        reflect.parametrizations.weight.original.fill_(1.0)  # a kernel whose reflect padding exceeds 1
    head = tl.FrobeniusLinear(64, 10)  # disjoint neurons: each row has norm 1, the matrix more
    with torch.no_grad():
        head.parametrizations.weight.original.add_(0.3 * torch.randn(10, 64))
    model = tl.Sequential(reflect, tl.GroupSort2(), nn.Flatten(), tl.SpectralLinear(16, 64), head)
    model.train()
    model(torch.rand(4, 1, 4, 4))
    model.eval()
    data = [(torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,)))]
    report = audit(model, data, attack="none", progress=False, out_dir=tmp_path / "audit")
    rows = {row.path: row for row in report.layers}
    assert rows["0"].claimed == 1.0 and rows["0"].claim == "refuted"
    assert rows["0"].bound == pytest.approx(10 / 9, rel=1e-6)  # the reflect-padded kernel of ones on 4 x 4
    assert rows["4"].claimed == 1.0 and rows["4"].claim == "refuted" and rows["4"].bound > 1.05
    assert rows["3"].claim == "holds" and rows["2"].claimed is None  # nn.Flatten claims nothing
    written = json.loads((tmp_path / "audit" / "audit.json").read_text(encoding="utf-8"))
    assert len(written["claims_not_met"]) == 2 and written["layers"][0]["claim"] == "refuted"
    markdown = (tmp_path / "audit" / "audit.md").read_text(encoding="utf-8")
    assert "| claimed |" in markdown and "1 **refuted**" in markdown
    assert sum(line.startswith("CLAIM: ") for line in report.summary().splitlines()) == 2


class _BatchDependent(nn.Module):
    """Scales its logits by 100 on batches of more than two samples: per sample, another map than the
    one the recording batch shows."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * (100.0 if x.shape[0] > 2 else 1.0)


def test_a_torchscript_model_that_depends_on_the_batch_size_is_refused() -> None:
    from certify.contract import UnboundableModuleError

    scripted = torch.jit.script(_BatchDependent().eval())
    with pytest.raises(UnboundableModuleError, match="other batch sizes"):
        analyze(scripted, (4,))


def test_a_pt2_program_for_one_batch_size_is_refused_with_the_fix(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    path = tmp_path / "static.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (torch.rand(1, 1, 4, 4),)), str(path))
    with pytest.raises(CheckpointError, match="batches of exactly 1 inputs.*dynamic batch dimension"):
        load_model(path)
