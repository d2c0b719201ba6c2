"""The moving average of the weights (lipnet.training.ema): its update rule, its constrained layers, and
that a run evaluates, bounds, checkpoints and certifies the averaged weights and resumes them bit for bit."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from certify.bounds import lipschitz_bound
from lipnet.layers import BjorckLinear
from lipnet.training.config import Config
from lipnet.training.ema import ExponentialMovingAverage
from lipnet.training.loop import Callback, classification_step, fit
from lipnet.training.run import TrainResult, certify_on_test, load_run_model, load_split, train
from lipnet.training.runs import RunFolder


class _Loader:
    def __init__(self, batches: int = 4, size: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batches * size, 6, generator=g)
        self.y = torch.randint(0, 3, (batches * size,), generator=g)
        self.batches, self.size = batches, size

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(self.batches):
            yield self.x[i * self.size : (i + 1) * self.size], self.y[i * self.size : (i + 1) * self.size]


def test_the_average_follows_the_documented_recurrence() -> None:
    """a <- d_t a + (1 - d_t) w after every step t, d_t = min(decay, (1 + t) / (10 + t)); buffers copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    ema = ExponentialMovingAverage(model, 0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    snapshots: list[dict[str, Tensor]] = []

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = _Loader()
    loader.x = loader.x.double()
    step = classification_step(nn.CrossEntropyLoss())

    class _Weights(Callback):
        def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    fit(model, opt, loader, step, epochs=2, lr=0.1, callbacks=[_Weights(), ema])
    params = {name for name, _ in model.named_parameters()}
    for t, weights in enumerate(snapshots):
        d = min(0.5, (1 + t) / (10 + t))
        for key, value in weights.items():
            if key in params:
                expected[key] = d * expected[key] + (1 - d) * value
            else:
                expected[key] = value
    assert [ema.decay_at(t) for t in (0, 1, 8, 100)] == [0.1, 2 / 11, 0.5, 0.5]
    for key, value in ema.state_dict().items():
        if key in params:
            torch.testing.assert_close(value, expected[key], rtol=1e-12, atol=1e-15)
        else:  # buffers: the trained model's, copied
            assert torch.equal(value, model.state_dict()[key]), key
    assert not any(p.requires_grad for p in ema.average.parameters()) and not ema.average.training


def test_the_average_of_a_constrained_layer_is_constrained_and_its_cache_follows() -> None:
    """The raw weights are averaged; the layer's parametrization turns the average into an orthonormal
    weight, and its eval-mode cache sees every update (the in-place update bumps the version counter)."""
    torch.manual_seed(0)
    model = BjorckLinear(6, 3)
    ema = ExponentialMovingAverage(model, 0.9)
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = ema.average(x).clone()
        model.parametrizations.weight.original.add_(torch.randn(3, 6))
    ema.update(50)
    with torch.no_grad():
        after = ema.average(x)
        direct = nn.functional.linear(x, ema.average.weight, ema.average.bias)
    assert not torch.equal(before, after) and torch.equal(after, direct)
    assert lipschitz_bound(ema.average) <= 1 + 1e-6
    singular = torch.linalg.svdvals(ema.average.weight.double())
    torch.testing.assert_close(singular, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, math.nan, math.inf])
def test_bad_decays_are_refused(decay: float) -> None:
    with pytest.raises(ValueError, match=r"decay must lie in \(0, 1\)"):
        ExponentialMovingAverage(nn.Linear(2, 2), decay)
    with pytest.raises(TypeError):
        ExponentialMovingAverage(nn.Linear(2, 2), True)


# ---------------------------------------------------------------------------------------------
# a run with optim.ema


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory, tiny_config: Callable[..., Config]) -> TrainResult:
    return train(tiny_config(tmp_path_factory.mktemp("ema") / "run", "optim.ema=0.5"), progress=False)


def test_a_run_evaluates_checkpoints_and_certifies_the_averaged_weights(
    ema_run: TrainResult, tiny_config: Callable[..., Config]
) -> None:
    run = RunFolder(ema_run.run_dir)
    last, final = run.load_checkpoint("last"), run.load_checkpoint("final")
    trained = last.state["training_model"]
    # the checkpoint's model is the average, which differs from the trained weights it also holds
    assert last.model.keys() == trained.keys()
    assert any(not torch.equal(last.model[k], trained[k]) for k in trained)
    for key, value in ema_run.model.state_dict().items():
        assert torch.equal(final.model[key], value), key
    # what was certified is the average: certifying the returned model again gives results.json
    cfg = tiny_config(ema_run.run_dir, "optim.ema=0.5")
    cert, _ = certify_on_test(
        ema_run.model,
        load_split(cfg, "test"),
        cfg.certify.eps,
        n=cfg.certify.n,
        batch_size=cfg.certify.batch_size,
        device=torch.device("cpu"),
        progress=False,
    )
    assert cert == run.read_results()["certify"]
    model, _ = load_run_model(run.path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ema_run.model.eval()(x))
    # the per-epoch bound is the average's too (the last epoch's: of the final weights)
    assert run.read_metrics()[-1]["lipschitz"] == lipschitz_bound(model, (3, 32, 32))
    summary = run.summary_path.read_text(encoding="utf-8")
    assert "EMA of the weights (decay 0.5)" in summary


def test_a_resumed_run_restores_the_average_bit_for_bit(
    ema_run: TrainResult, tmp_path: Path, tiny_config: Callable[..., Config]
) -> None:
    cfg = tiny_config(tmp_path / "run", "optim.ema=0.5")
    first = train(cfg, progress=False, stop_after_epoch=1)
    assert not first.finished
    second = train(cfg, resume=True, progress=False)
    reference, resumed = RunFolder(ema_run.run_dir), RunFolder(second.run_dir)
    ref_last, last = reference.load_checkpoint("last"), resumed.load_checkpoint("last")
    for key in ref_last.model:
        assert torch.equal(ref_last.model[key], last.model[key]), key
        assert torch.equal(ref_last.state["training_model"][key], last.state["training_model"][key]), key
    assert [r["test_acc"] for r in reference.read_metrics()] == [
        r["test_acc"] for r in resumed.read_metrics()
    ]
    assert resumed.read_results()["certify"] == reference.read_results()["certify"]
