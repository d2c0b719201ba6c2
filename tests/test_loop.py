"""The one fit loop (lipnet.training.loop): schedule and warm-up, callbacks (gradient clipping), epoch sums,
resume, divergence, time cap, progress bars only on a terminal."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lipnet.losses import TauCrossEntropy
from lipnet.training.loop import (
    Callback,
    EpochResult,
    FitResult,
    GradientClipping,
    StepOutput,
    TrainingDivergedError,
    classification_step,
    fit,
    lr_at,
    show_bars,
)


class _Loader:
    """``batches`` batches of ``size`` samples, reshuffled by epoch (as DeviceLoader's set_epoch)."""

    def __init__(self, batches: int = 3, size: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batches * size, 5, generator=g)
        self.y = torch.randint(0, 3, (batches * size,), generator=g)
        self.batches, self.size, self.epoch = batches, size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.epoch))
        for i in range(self.batches):
            idx = order[i * self.size : (i + 1) * self.size]
            yield self.x[idx], self.y[idx]


class _Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.lrs: list[float] = []
        self.epochs: list[EpochResult] = []
        self.grads_seen: list[bool] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.events.append(("start", epoch))

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.events.append(("before", step))
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.grads_seen.append(all(p.grad is not None for p in model.parameters()))

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.events.append(("after", step))

    def on_epoch_end(self, result: EpochResult) -> None:
        self.events.append(("end", result.epoch))
        self.epochs.append(result)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(5, 3)


def _fit_sgd(model: nn.Module, *, lr: float, epochs: int = 1, **options: Any) -> FitResult:
    """:func:`fit` with plain SGD at ``lr`` on :class:`_Loader` batches and cross-entropy, the set-up most
    tests share; ``options`` are fit's other keywords."""
    return fit(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        _Loader(),
        classification_step(nn.CrossEntropyLoss()),
        epochs=epochs,
        lr=lr,
        **options,
    )


def test_every_step_gets_its_scheduled_lr_and_the_hooks_in_order() -> None:
    model, loader, rec = _model(), _Loader(), _Recorder()
    losses: list[tuple[float, int]] = []
    base = classification_step(nn.CrossEntropyLoss())

    def step(m: nn.Module, batch: Sequence[Tensor]) -> StepOutput:
        out = base(m, batch)
        losses.append((float(out.loss.detach()), len(batch[0])))
        return out

    result = fit(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loader, step, epochs=2, lr=0.1, callbacks=[rec]
    )
    assert rec.lrs == [lr_at(s, 6, 0.1, "cosine") for s in range(6)]
    assert rec.grads_seen == [True] * 6
    expected = []
    for epoch in range(2):
        expected.append(("start", epoch))
        for s in range(3 * epoch, 3 * epoch + 3):
            expected += [("before", s), ("after", s)]
        expected.append(("end", epoch + 1))
    assert rec.events == expected
    assert (result.epochs, result.step, result.stopped) == (2.0, 6, None)
    assert [(e.epoch, e.step, e.samples) for e in rec.epochs] == [(1, 3, 12), (2, 6, 12)]
    for e, chunk in zip(rec.epochs, (losses[:3], losses[3:]), strict=True):
        # the epoch loss is the batch losses weighted by batch size, summed in float64
        assert e.loss == pytest.approx(sum(v * n for v, n in chunk) / sum(n for _, n in chunk), rel=1e-12)
        assert 0 <= e.stats["correct"] <= 12 and e.lr == rec.lrs[e.step - 1]


def test_a_resumed_fit_ends_with_the_same_weights() -> None:
    """The loop draws no random numbers: stopping after epoch 1 and going on from its step counter ends
    bitwise where one call does."""
    straight = _model()
    opt = torch.optim.Adam(straight.parameters(), lr=0.05)
    fit(straight, opt, _Loader(), classification_step(nn.CrossEntropyLoss()), epochs=3, lr=0.05)
    resumed = _model()
    opt = torch.optim.Adam(resumed.parameters(), lr=0.05)
    step = classification_step(nn.CrossEntropyLoss())
    first = fit(resumed, opt, _Loader(), step, epochs=3, lr=0.05, stop_after_epoch=1)
    assert (first.stopped, first.step, len(first.history)) == ("stop_after_epoch", 3, 1)
    fit(resumed, opt, _Loader(), step, epochs=3, lr=0.05, start_epoch=1, start_step=first.step)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_nan_loss_is_divergence_with_where_and_what_to_do() -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def step(m: nn.Module, batch: Sequence[Tensor]) -> StepOutput:
        calls.append(1)
        loss = m(batch[0]).square().mean()
        return StepOutput(loss * (math.nan if len(calls) == 2 else 1.0))

    with pytest.raises(TrainingDivergedError) as info:
        fit(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _Loader(),
            step,
            epochs=2,
            lr=0.1,
            advice=lambda epoch: f"lower --lr (epoch {epoch})",
            label="task/method",
        )
    assert str(info.value) == (
        "task/method: the training loss became nan at step 2 (epoch 1): lower --lr (epoch 0)"
    )
    # the first step updated the weights, the diverged one did not
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class _NaNOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :3] * self.weight * math.nan


def test_nan_logits_stop_before_the_loss_sees_them() -> None:
    """The loss would refuse NaN logits as bad input (ValueError); in training they are divergence."""
    model = _NaNOutput()
    with pytest.raises(TrainingDivergedError, match=r"^the logits became NaN or Inf at step 1 \(epoch 1\)"):
        fit(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _Loader(),
            classification_step(TauCrossEntropy(1.0)),
            epochs=1,
            lr=0.1,
        )
    assert torch.equal(model.weight, torch.ones(3))


def test_the_time_cap_lets_the_first_step_run_then_stops() -> None:
    model, rec = _model(), _Recorder()
    result = _fit_sgd(model, lr=0.1, epochs=2, time_cap=1e-12, callbacks=[rec])
    assert (result.step, result.stopped, result.history) == (1, "time cap", [])
    assert result.epochs == pytest.approx(1 / 3) and result.seconds > 0
    assert rec.events == [("start", 0), ("before", 0), ("after", 0)]


def test_reduce_sums_the_epoch_over_processes() -> None:
    """Under DDP the loss, sample count and stats are summed over processes before the mean is taken."""
    rec = _Recorder()
    model = _model()
    _fit_sgd(
        model,
        lr=0.0,
        reduce=lambda values: [2 * v for v in values],  # two processes that saw the same
        callbacks=[rec],
        schedule="none",
    )
    single = _Recorder()
    model = _model()
    _fit_sgd(model, lr=0.0, callbacks=[single], schedule="none")
    (two,), (one,) = rec.epochs, single.epochs
    assert two.samples == 2 * one.samples and two.stats["correct"] == 2 * one.stats["correct"]
    assert two.loss == one.loss


# ---------------------------------------------------------------------------------------------
# warm-up, gradient clipping, progress bars


def test_warmup_ramps_linearly_then_runs_the_schedule_over_the_rest() -> None:
    total, base = 100, 0.1
    lrs = [lr_at(s, total, base, "cosine", 0.1) for s in range(total)]
    assert lrs[:10] == [base * (s + 1) / 10 for s in range(10)]
    # then the cosine over the 90 remaining steps, starting from the base rate
    assert lrs[10:] == [base * 0.5 * (1.0 + math.cos(math.pi * s / 90)) for s in range(90)]
    assert [lr_at(s, total, base, "none", 0.25) for s in (0, 24, 25, 99)] == [base / 25, base, base, base]
    # no warm-up: exactly the schedule as before (a resumed run of an older config draws the same rates)
    assert [lr_at(s, total, base, "cosine", 0.0) for s in range(total)] == [
        base * 0.5 * (1.0 + math.cos(math.pi * s / total)) for s in range(total)
    ]
    # a warm-up shorter than half a step rounds to none
    assert lr_at(0, 4, base, "cosine", 0.1) == base


@pytest.mark.parametrize(
    ("schedule", "warmup", "match"),
    [("onecycle", 0.1, "own warm-up"), ("cosine", 1.0, r"in \[0, 1\)"), ("cosine", -0.1, r"in \[0, 1\)")],
)
def test_bad_warmup_is_refused_before_any_step(schedule: str, warmup: float, match: str) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        _fit_sgd(model, lr=0.1, schedule=schedule, warmup=warmup)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fit_passes_the_warmup_to_every_step() -> None:
    model, rec = _model(), _Recorder()
    _fit_sgd(model, lr=0.1, epochs=2, warmup=0.5, callbacks=[rec])
    assert rec.lrs == [lr_at(s, 6, 0.1, "cosine", 0.5) for s in range(6)]
    assert rec.lrs[:3] == [0.1 * (s + 1) / 3 for s in range(3)]  # three warm-up steps of six


class _GradNorms(Callback):
    """The global gradient norm each optimiser step sees (after the callbacks before it)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


def test_gradient_clipping_caps_the_global_norm_and_leaves_small_gradients_alone() -> None:
    raw = _GradNorms()
    model = _model()
    _fit_sgd(model, lr=0.0, callbacks=[raw])
    cap = sorted(raw.norms)[1]  # between the smallest and the largest norm of the three steps
    clipped = _GradNorms()
    model = _model()
    _fit_sgd(model, lr=0.0, callbacks=[GradientClipping(cap), clipped])
    for before, after in zip(raw.norms, clipped.norms, strict=True):
        if before <= cap:
            assert after == pytest.approx(before, rel=1e-6)
        else:  # scaled by cap / (norm + 1e-6): at most cap, and within 1e-6 relative of it
            assert after <= cap and after == pytest.approx(cap, rel=1e-5)
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipping(0.0)
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipping(math.inf)


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bars_only_on_a_terminal(tty: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log file (stderr not a terminal) gets nothing per step; a terminal gets the bar."""
    stream = _Stream(tty)
    monkeypatch.setattr("sys.stderr", stream)
    assert show_bars(True) is tty and show_bars(False) is False
    model = _model()
    _fit_sgd(model, lr=0.1, progress=True)
    assert ("epoch 1/1" in stream.text) is tty
    if not tty:
        assert stream.text == ""
