"""``lipnet bench layers --per-layer`` and ``lipnet bench models`` at tiny sizes; the spectrum probe; the
eval-vs-export measurement (with a fake clock: no test here asserts a timing)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lipnet.bench.layers import OPERATOR_JACOBIAN, OPERATOR_MATRIX, saved_bytes, singular_value_range
from lipnet.bench.models import EVAL_KWARGS, bench_eval, plain_share
from lipnet.cli import main
from lipnet.layers import AOLLinear, SLLConv2d, SLLLinear
from lipnet.models import list_models

#: The exported layers hold float32 weights: an AOL kernel rescaled in float32 can exceed norm 1 by
#: a few float32 ulps, which the float64 spectrum of those weights shows.
FLOAT32_SLACK = 1e-6

PER_LAYER_COLUMNS = (
    "| kind | implementation | train step (ms) | eval forward (ms) | saved for backward (MiB) | "
    "CUDA peak (MiB) | σ_min | σ_max | operator | train / anchor | eval / anchor | saved / anchor |"
)
MODELS_COLUMNS = (
    "| implementation | kind | mode | train step (ms) | images/s | s per 50k epoch | "
    "published A100 s/epoch (M) | train / anchor | eval forward (ms) | eval / anchor | exported eval (ms) | "
    "eval / exported | plain share |"
)
EVAL_COLUMNS = (
    "| model | kind | parameters (M) | plain share | eval min (ms) | eval median (ms) | exported min (ms) | "
    "exported median (ms) | eval / exported (median) | eval / exported (min) | max rel. diff |"
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
    assert saved_bytes(lambda: net(x).sum().backward(), own) == 2 * 3 * 4 * 4 * 4


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


def test_bench_models_with_anchor_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("orthogonium")
    pytest.importorskip("deel.torchlip")
    out = tmp_path / "models.json"
    argv = ["bench", "models", "--model", "lipconvnet_xs", "--kinds", "aol,bjorck", "--batch", "2"]
    argv += ["--input-size", "4", "--rounds", "1", "--device", "cpu"]
    code, stdout, err = _run([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    assert MODELS_COLUMNS in stdout and "lipconvnet_xs, batch 2x3x4x4, CPU" in stdout
    assert "lipnet:aol vs orthogonium:aol" in stdout
    rows = {r["implementation"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["lipnet:aol", "orthogonium:aol", "lipnet:bjorck", "deel-torchlip:spectral"]
    for lipnet_row, anchor_row in (
        ("lipnet:aol", "orthogonium:aol"),
        ("lipnet:bjorck", "deel-torchlip:spectral"),
    ):
        ours, anchor = rows[lipnet_row], rows[anchor_row]
        assert not ours["anchor"] and anchor["anchor"] and ours["kind"] == anchor["kind"]
        assert ours["train_vs_anchor"] == pytest.approx(ours["train_ms"] / anchor["train_ms"], rel=1e-9)
        assert ours["eval_vs_anchor"] == pytest.approx(ours["eval_ms"] / anchor["eval_ms"], rel=1e-9)
        assert anchor["train_vs_anchor"] == anchor["eval_vs_anchor"] == 1.0
    for r in rows.values():
        assert r["images_per_s"] == pytest.approx(2e3 / r["train_ms"], rel=1e-9)
        assert r["s_per_epoch"] == pytest.approx(50_000 / r["images_per_s"], rel=1e-9)
        if r["plain_eval_ms"] is not None:
            assert r["eval_vs_plain"] == pytest.approx(r["eval_ms"] / r["plain_eval_ms"], rel=1e-9)
    assert (
        rows["lipnet:aol"]["published_s_per_epoch"]
        == rows["orthogonium:aol"]["published_s_per_epoch"]
        == 19.6
    )
    assert rows["lipnet:bjorck"]["published_s_per_epoch"] is None
    # lipnet's export turns every layer of the AOL net into a plain one
    assert rows["lipnet:aol"]["plain_share"] == 1.0 and rows["lipnet:aol"]["plain_eval_ms"] > 0

    md = tmp_path / "models.md"
    code, stdout, err = _run([*argv[:5], "aol", *argv[6:], "--no-anchors", "--out", str(md)], capsys)
    assert code == 0, err
    table = md.read_text()
    (row,) = [line for line in table.splitlines() if line.startswith("| lipnet:aol |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 13 and cells[2] == "eager" and cells[6] == "19.6" and cells[7] == cells[9] == "–"
    assert "orthogonium" not in table
    code, _, err = _run([*argv[:5], "nope", "--device", "cpu"], capsys)
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1


def test_bench_models_anchors_need_a_model_that_takes_a_layer_kind(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("orthogonium")
    argv = ["bench", "models", "--model", "small_cnn", "--kinds", "aol", "--batch", "2", "--rounds", "1"]
    code, _, err = _run([*argv, "--device", "cpu"], capsys)
    assert code == 2 and "--no-anchors" in err and "orthogonium:aol" in err


class _FakeClock:
    """A timer for :func:`bench_eval` that runs the call and returns a scripted time instead of measuring.

    A call that runs a parametrized module is the model's (the export has none): it gets the next of
    ``model_times``; any other call gets the next of ``export_times``. ``calls`` records which it was.
    """

    def __init__(self, model_times: list[float], export_times: list[float]) -> None:
        self.model_times, self.export_times = list(model_times), list(export_times)
        self.calls: list[str] = []

    def __call__(self, fn: Callable[[], object], device: torch.device) -> float:
        ran: list[nn.Module] = []
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: ran.append(m))
        try:
            fn()
        finally:
            handle.remove()
        if any(parametrize.is_parametrized(m) for m in ran):
            self.calls.append("model")
            return self.model_times.pop(0)
        self.calls.append("export")
        return self.export_times.pop(0)


def test_bench_eval_pairs_each_model_with_its_export() -> None:
    # the pairs take turns: small_cnn/aol gets the 1st, 3rd and 5th time of each list
    clock = _FakeClock([3.0, 1.0, 2.0, 5.0, 1.0, 2.0], [1.0, 0.5, 4.0, 1.0, 0.25, 2.0])
    rows, skipped = bench_eval(
        models=["small_cnn"], kinds=["aol", "cpl", "bjorck"], batch=2, rounds=3, warmup=1, timer=clock
    )
    assert skipped == ["small_cnn:cpl"]  # small_cnn takes aol and bjorck only
    assert [(r["model"], r["kind"]) for r in rows] == [("small_cnn", "aol"), ("small_cnn", "bjorck")]
    # rounds alternate which goes first; pairs are interleaved within a round; warm-up is not timed
    assert clock.calls == ["model", "export"] * 2 + ["export", "model"] * 2 + ["model", "export"] * 2
    aol, bjorck = rows
    assert (aol["eval_median_ms"], aol["eval_min_ms"]) == (2e3, 1e3)  # 3, 2, 1 s
    assert (aol["exported_median_ms"], aol["exported_min_ms"]) == (1e3, 250.0)  # 1, 4, 0.25 s
    assert (aol["ratio_median"], aol["ratio_min"]) == (2.0, 4.0)
    assert (bjorck["ratio_median"], bjorck["ratio_min"]) == (2.0, 2.0)  # 1, 5, 2 over 0.5, 1, 2
    for r in rows:
        assert r["max_diff"] <= 1e-6 and r["params"] > 0
    # every exported parameter sits in plain convolutions and linear layers, but for the BatchNorm2d that
    # the AOL network's default centring (small_cnn, issue 13) exports to
    assert bjorck["plain_share"] == 1.0
    from lipnet import export
    from lipnet.models import create

    exported = export(create("small_cnn", conv="aol"))
    total = sum(p.numel() for p in exported.parameters())
    norms = [m for m in exported.modules() if type(m) is nn.BatchNorm2d]
    shifts = sum(p.numel() for m in norms for p in m.parameters(recurse=False))
    assert shifts > 0 and aol["plain_share"] == (total - shifts) / total


def test_bench_eval_models_without_kinds_and_residual_blocks() -> None:
    clock = _FakeClock([1.0] * 2, [1.0] * 2)
    rows, skipped = bench_eval(models=["sll_small"], kinds=["aol"], batch=2, rounds=2, warmup=0, timer=clock)
    (row,) = rows
    assert skipped == [] and row["kind"] is None and row["ratio_median"] == 1.0
    from lipnet.models import create

    model = create("sll_small", **EVAL_KWARGS["sll_small"])
    head = model[-1]
    assert isinstance(head, AOLLinear)
    # export turns the AOL head into an nn.Linear and every SLL block into a residual step of a plain
    # nn.Conv2d / nn.Linear and its transpose: all parameters end in plain torch layers
    total = sum(p.numel() for p in model.parameters())
    assert row["plain_share"] == 1.0
    assert row["params"] == pytest.approx(total / 1e6, rel=1e-12)


def test_bench_eval_refuses_an_export_that_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    # the name bench_eval calls: lipnet.bench.models imported the function lipnet.export.export
    module = importlib.import_module("lipnet.bench.models")
    real = module.export

    def shifted(model: nn.Module) -> nn.Module:
        return nn.Sequential(real(model), _Shift())

    monkeypatch.setattr(module, "export", shifted)
    with pytest.raises(RuntimeError, match="differs from the model"):
        bench_eval(models=["small_cnn"], kinds=["aol"], batch=2, rounds=1, timer=_FakeClock([], []))


class _Shift(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1e-3


def test_eval_kwargs_name_registered_models_and_plain_share() -> None:
    assert set(EVAL_KWARGS) <= set(list_models())
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), AOLLinear(4, 2), nn.Conv2d(1, 1, 1, bias=False))
    assert plain_share(net) == pytest.approx((12 + 4 + 1) / (12 + 4 + 8 + 2 + 1), rel=1e-12)
    assert plain_share(nn.ReLU()) == 1.0


def test_bench_models_eval_only_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    argv = ["bench", "models", "--eval-only", "--models", "small_cnn", "--kinds", "aol", "--batch", "2"]
    code, stdout, err = _run([*argv, "--rounds", "1", "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0, err
    assert EVAL_COLUMNS in stdout and "| small_cnn | aol |" in stdout
    body = json.loads(out.read_text())
    assert body["batch"] == 2 and [r["kind"] for r in body["rows"]] == ["aol"]
    code, _, err = _run([*argv[:4], "nope", "--device", "cpu"], capsys)
    assert code == 2 and "nope" in err


@pytest.mark.parametrize("block", [SLLLinear(6, 4), SLLConv2d(3, 2, 3)])
def test_sll_eval_forward_reuses_its_scaled_weight(block: nn.Module) -> None:
    # the eval forward of a warm SLL block is the frozen block's two products: the rescaled weight of
    # the second one is cached until the weights change, and never cached in training

    def expected() -> torch.Tensor:
        steps = 2.0 * block.inverse_scales()
        return block.weight * steps.reshape(-1, *(1,) * (block.weight.ndim - 1))

    block.eval()
    with torch.no_grad():
        first = block.step_weight()
        assert block.step_weight() is first and torch.equal(first, expected())
        block.weight.mul_(0.5)  # an in-place update, as an optimizer step
        again = block.step_weight()
        assert again is not first and torch.equal(again, expected())
    block.train()
    assert block.step_weight() is not block.step_weight()


def test_aoc_anchor_runs_as_many_bjorck_steps_as_lipnet_aoc() -> None:
    pytest.importorskip("orthogonium")
    from orthogonium.reparametrizers import BatchedBjorckOrthogonalization

    from lipnet.bench.anchors import anchor_kind, orthogonium_kinds
    from lipnet.layers.aoc import AOC_BJORCK_ITERATIONS, AOCConv2d

    def steps(layer: nn.Module) -> set[int]:
        return {m.niters for m in layer.modules() if isinstance(m, BatchedBjorckOrthogonalization)}

    library, kind = anchor_kind("aoc")
    assert library == "orthogonium"
    assert steps(kind.block(8, 3)) == steps(kind.block(8, 1)) == {AOC_BJORCK_ITERATIONS}
    assert steps(AOCConv2d(8, 8, 3)) == {AOC_BJORCK_ITERATIONS}
    assert steps(orthogonium_kinds()["aoc"].block(8, 3)) == {12}  # orthogonium's default, unless asked
    with pytest.raises(ValueError, match="aoc_iterations"):
        orthogonium_kinds(aoc_iterations=0)
