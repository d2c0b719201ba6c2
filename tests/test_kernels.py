"""``lipnet bench kernels``: the operation counts of a training step are deterministic, and lipnet's Björck
networks dispatch fewer kernels than deel-torchlip's and than their own per-layer computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lipnet.bench.kernels import OpCounter, bench_kernels, count_step
from lipnet.cli import main


def test_count_step_counts_forward_backward_and_optimiser() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    first, second = count_step(net, x, y), count_step(net, x, y)
    assert first == second  # deterministic
    ops = first.by_op
    # two affine layers forward, their products backward (the first layer's input needs no gradient)
    assert ops["aten.addmm.default"] == 2 and ops["aten.mm.default"] == 3
    assert ops["aten.threshold_backward.default"] == 1 and ops["aten._foreach_add_.Scalar"] >= 1
    assert first.kernels < first.ops == sum(ops.values())
    with OpCounter() as counter:
        torch.ones(2).t()
    assert [str(op) for op in counter.ops] == ["aten.ones.default", "aten.t.default"]


def test_bjorck_dispatches_fewer_kernels_than_deel_torchlip_and_than_per_layer() -> None:
    # the issue-14 targets that a CPU can check: lipnet Björck at or below deel-torchlip on small_cnn and
    # bethune_vgg; the batched weights below the per-layer computation
    rows, skipped = bench_kernels(kinds=["bjorck"], width=32)
    assert skipped == []
    by = {(r["network"], r["implementation"]): r for r in rows}
    for network in ("small_cnn", "bethune_vgg"):
        ours, cpu, per_layer = (
            by[(network, label)]
            for label in ("lipnet:bjorck", "lipnet:bjorck [cpu batching]", "lipnet:bjorck [per layer]")
        )
        deel, plain = by[(network, "deel-torchlip:spectral")], by[(network, "plain")]
        assert ours["kernels"] <= deel["kernels"] and ours["ops"] <= deel["ops"], network
        assert ours["kernels"] < cpu["kernels"] <= per_layer["kernels"], network
        assert plain["kernels"] < ours["kernels"]
        assert ours["kernels_vs_anchor"] == pytest.approx(ours["kernels"] / deel["kernels"], rel=1e-12)
        assert ours["kernels_vs_plain"] == pytest.approx(ours["kernels"] / plain["kernels"], rel=1e-12)
        assert deel["kernels_vs_anchor"] == 1.0 and plain["kernels_vs_anchor"] is None


def test_bench_kernels_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kernels.json"
    argv = ["bench", "kernels", "--networks", "small_cnn", "--kinds", "aol", "--width", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| network | implementation | ATen ops / step | kernels (non-view) / step |" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["implementation"] for r in rows][-1] == "plain"
    assert {r["network"] for r in rows} == {"small_cnn"}
    with pytest.raises(ValueError, match="unknown network"):
        bench_kernels(networks=["resnet"])
