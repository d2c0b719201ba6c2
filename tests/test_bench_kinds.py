"""``lipnet bench layers --per-layer`` and ``lipnet bench models`` at tiny sizes; the spectrum probe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lipnet.bench import OPERATOR_JACOBIAN, OPERATOR_MATRIX, _saved_bytes, singular_value_range
from lipnet.cli import main

#: The exported layers hold float32 weights: an AOL kernel rescaled in float32 can exceed norm 1 by
#: a few float32 ulps, which the float64 spectrum of those weights shows.
FLOAT32_SLACK = 1e-6

PER_LAYER_COLUMNS = (
    "| kind | implementation | train step (ms) | eval forward (ms) | saved for backward (MiB) | "
    "CUDA peak (MiB) | σ_min | σ_max | operator | train / anchor | eval / anchor | saved / anchor |"
)
MODELS_COLUMNS = (
    "| kind | train step (ms) | images/s | s per 50k epoch | published A100 s/epoch (M) | eval forward (ms) "
    "| exported eval (ms) | eval / exported |"
)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_singular_value_range_of_a_known_linear_map_and_of_a_relu() -> None:
    conv = nn.Conv2d(2, 2, 1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.diag(torch.tensor([2.0, 0.5])).reshape(2, 2, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, -100.0]))
    lo, hi, how = singular_value_range(conv, (2, 3, 3))
    assert how == OPERATOR_MATRIX
    assert lo == pytest.approx(0.5, abs=1e-12) and hi == pytest.approx(2.0, abs=1e-12)
    lo, hi, how = singular_value_range(nn.Sequential(conv, nn.ReLU()), (2, 3, 3), seed=1)
    assert how == OPERATOR_JACOBIAN
    # channel 1 (gain 0.5) is never active; channel 0 (gain 2) is where the random point is positive
    assert lo == 0.0 and hi == pytest.approx(2.0, abs=1e-12)


def test_saved_bytes_counts_only_what_backward_keeps() -> None:
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    own = {t.untyped_storage().data_ptr() for t in (*net.parameters(), x)}
    # the convolution saves its input and weight (excluded); ReLU saves its output: 2*3*4*4 floats
    assert _saved_bytes(lambda: net(x).sum().backward(), own) == 2 * 3 * 4 * 4 * 4


def test_bench_layers_per_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("orthogonium")
    out = tmp_path / "layers.json"
    argv = ["bench", "layers", "--kinds", "aoc,aol,cayley,sll", "--channels", "4", "--size", "8"]
    argv += ["--batch", "2", "--rounds", "1", "--sv-channels", "4", "--sv-size", "6", "--device", "cpu"]
    code, stdout, err = _run([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    assert PER_LAYER_COLUMNS in stdout
    rows = {r["implementation"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == [
        "lipnet aoc",
        "orthogonium AdaptiveOrthoConv2d",
        "lipnet aol",
        "orthogonium AOLConv2D",
        "lipnet cayley",
        "lipnet sll",
        "orthogonium SDPBasedLipschitzResBlock",
    ]
    for name in ("lipnet cayley", "lipnet aoc", "orthogonium AdaptiveOrthoConv2d"):
        r = rows[name]
        assert r["operator"] == OPERATOR_MATRIX
        assert abs(r["sv_min"] - 1) <= 1e-4 and abs(r["sv_max"] - 1) <= 1e-4, r
    for name in ("lipnet aol", "orthogonium AOLConv2D"):
        assert rows[name]["sv_max"] <= 1 + FLOAT32_SLACK, rows[name]
    for name in ("lipnet sll", "orthogonium SDPBasedLipschitzResBlock"):
        assert rows[name]["operator"] == OPERATOR_JACOBIAN
        assert 0 <= rows[name]["sv_min"] <= rows[name]["sv_max"] <= 1 + FLOAT32_SLACK
    assert rows["lipnet cayley"]["train_vs_anchor"] is None
    assert rows["orthogonium AOLConv2D"]["train_vs_anchor"] == 1.0
    for r in rows.values():
        assert r["train_ms"] > 0 and r["eval_ms"] > 0 and r["saved_mib"] >= 0 and r["cuda_peak_mib"] is None
    # Cayley keeps the FFT of its input for backward
    assert rows["lipnet cayley"]["saved_mib"] > 0

    md = tmp_path / "layers.md"
    code, stdout, err = _run([*argv[:3], "aol", *argv[4:], "--out", str(md)], capsys)
    assert code == 0, err
    table = md.read_text()
    assert PER_LAYER_COLUMNS in table and "| aol | lipnet aol |" in table and "cayley" not in table
    code, _, err = _run([*argv[:3], "aol,nope", *argv[4:]], capsys)
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1


def test_bench_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models.md"
    argv = ["bench", "models", "--model", "lipconvnet_xs", "--kinds", "aol", "--batch", "2", "--rounds", "1"]
    code, stdout, err = _run([*argv, "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0, err
    assert MODELS_COLUMNS in stdout and "lipconvnet_xs, batch 2x3x32x32, CPU" in stdout
    (row,) = [line for line in out.read_text().splitlines() if line.startswith("| aol |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 8 and cells[4] == "19.6"
    train_ms, images_per_s, s_per_epoch = (float(c) for c in cells[1:4])
    assert images_per_s == pytest.approx(2e3 / train_ms, rel=1e-2)
    assert s_per_epoch == pytest.approx(50_000 / images_per_s, rel=1e-2)
    assert float(cells[7]) > 0
    code, _, err = _run([*argv[:5], "nope", "--device", "cpu"], capsys)
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1
