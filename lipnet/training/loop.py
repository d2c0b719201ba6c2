"""The one fit loop: epochs of batches, the learning-rate schedule, optimiser steps, divergence.

Every command that trains calls :func:`fit` (``lipnet train`` and ``lipnet sweep`` through
:func:`lipnet.training.run.train`, ``lipnet bench fmnist``, ``lipnet catalogue``). What differs between
them is what one batch costs, given as a *step*: ``step(model, batch) -> StepOutput(loss, stats)``
computes the loss to minimise on one batch (a classification loss on logits, a multi-task or a MIL
loss on bags) and, in ``stats``, per-batch sums to add up over the epoch (``correct`` predictions,
...). The loop does the rest, the same for all:

* per epoch: ``loader.set_epoch(epoch)`` (a :class:`~lipnet.data.DeviceLoader` reshuffles), the model in
  train mode, then for each batch the learning rate ``lr_at(step, total)`` (the schedule after an
  optional linear warm-up) on every parameter group,
  the step, ``zero_grad`` / ``backward`` / ``optimizer.step()``;
* the epoch's mean loss (float64, weighted by batch size: ``len(batch[0])`` samples) and the sums of
  ``stats``, reduced over processes by ``reduce`` under DDP;
* divergence: a loss (or whatever a step passes to :func:`require_finite`) that is NaN or Inf raises
  :class:`TrainingDivergedError`, the one exception for it, which the CLI maps to a one-line error and
  exit code 1. Checked per step on host tensors, where it costs nothing; on an accelerator a check
  would wait for the device every step, so there the epoch's loss is checked once it is reduced;
* an optional time cap on the training time, the summed time of the steps (from setting the learning
  rate to the end of the optimiser step): no step starts once it is reached; ``stop_after_epoch`` and a
  start epoch / step to resume from;
* callbacks (:class:`Callback`): at the start and end of each epoch (per-epoch evaluation,
  checkpoints, metrics files, a task's epoch state) and around each optimiser step
  (:meth:`Callback.before_optimizer_step` sees the gradients, :meth:`Callback.after_optimizer_step` the
  updated weights): gradient clipping (:class:`GradientClipping`) and the moving average of the
  weights (:class:`lipnet.training.ema.ExponentialMovingAverage`) are such callbacks;
* progress: tqdm bars only when stderr is a terminal (:func:`show_bars`), nothing per step otherwise.

The loop draws no random numbers of its own, so a resumed run draws what the uninterrupted one drew
(bitwise equal weights on CPU): the schedule is a function of the step counter, the data order of
the loader's seed and the epoch.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "Callback",
    "EpochResult",
    "FitResult",
    "GradientClipping",
    "SCHEDULES",
    "StepFn",
    "StepOutput",
    "TrainingDivergedError",
    "classification_step",
    "fit",
    "lr_at",
    "require_finite",
    "show_bars",
]

#: The learning-rate schedules of :func:`lr_at`.
SCHEDULES: tuple[str, ...] = ("cosine", "onecycle", "none")


class TrainingDivergedError(RuntimeError):
    """The training loss (or the model's output) became NaN or Inf; what was saved before stays as it was."""


class _NonFinite(ArithmeticError):
    """Raised by :func:`require_finite` inside a step; :func:`fit` turns it into a TrainingDivergedError
    that says at which step of which epoch."""

    def __init__(self, what: str, value: str) -> None:
        super().__init__(what)
        self.what, self.value = what, value


def require_finite(value: Tensor, what: str) -> None:
    """In a step: stop training as diverged when ``value`` holds NaN or Inf (``what``: ``the logits``).

    Checked only for a tensor on the CPU, where it costs no device synchronisation; on an accelerator
    the epoch's loss check of :func:`fit` catches the divergence instead.
    """
    if value.device.type == "cpu" and not bool(torch.isfinite(value).all()):
        shown = f"{float(value)}" if value.numel() == 1 else "NaN or Inf"
        raise _NonFinite(what, shown)


class StepOutput(NamedTuple):
    """What a step returns: the scalar loss to minimise (the batch mean) and per-batch sums to accumulate
    over the epoch (detached by the loop; e.g. ``{"correct": (pred == y).sum()}``)."""

    loss: Tensor
    stats: Mapping[str, Tensor] = {}


class StepFn(Protocol):
    """``step(model, batch) -> StepOutput``: the forward pass and the loss of one batch."""

    def __call__(self, model: nn.Module, batch: Sequence[Tensor], /) -> StepOutput: ...


class _Loader(Protocol):
    def __iter__(self) -> Iterator[Sequence[Tensor]]: ...

    def __len__(self) -> int: ...


@dataclass
class EpochResult:
    """One finished epoch: ``epoch`` 1-based, ``step`` the optimiser steps so far (all epochs), ``loss`` the
    mean training loss, ``stats`` the summed step stats, ``samples`` the samples seen (all processes),
    ``lr`` the last learning rate used and ``seconds`` its wall-clock time (the batches, their loading
    included, and the reduction of the sums)."""

    epoch: int
    step: int
    loss: float
    stats: dict[str, float]
    samples: int
    lr: float
    seconds: float


@dataclass
class FitResult:
    """What :func:`fit` did: the epochs run (fractional when the time cap stopped it mid-epoch), the step
    counter, the training time of this call in seconds (the summed step times the time cap limits), why
    it stopped early (``"time cap"``, ``"stop_after_epoch"``; ``None`` when every epoch ran) and the
    finished epochs."""

    epochs: float
    step: int
    seconds: float
    stopped: str | None = None
    history: list[EpochResult] = field(default_factory=list)


class Callback:
    """Hooks of :func:`fit`; each does nothing here, a subclass overrides the ones it needs.

    ``on_epoch_end`` runs on every process (under DDP it is the place for a barrier); an exception it
    raises ends training.
    """

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first batch of ``epoch`` (0-based)."""

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After ``backward``, before ``optimizer.step()`` of step ``step`` (0-based): the gradients."""

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After ``optimizer.step()`` of step ``step`` (0-based): the updated weights."""

    def on_epoch_end(self, result: EpochResult) -> None:
        """After the epoch's loss and stats are reduced and checked."""


class GradientClipping(Callback):
    """Scale the gradients down to a global L2 norm of at most ``max_norm`` before each optimiser step.

    :func:`torch.nn.utils.clip_grad_norm_` over every parameter of the model the loop trains: with
    ``g`` the gradients of all parameters as one vector, ``g <- g min(1, max_norm / (||g||_2 + 1e-6))``.
    Under DDP the gradients are already averaged over the processes when it runs, so every process
    clips the same vector. A NaN or Inf gradient is left as it is (the loss check reports the divergence).
    """

    def __init__(self, max_norm: float) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
            raise TypeError(f"max_norm must be a number, got {max_norm!r}")
        if not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)


def lr_at(step: int, total: int, base: float, schedule: str, warmup: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based) out of ``total``.

    ``cosine``: ``base (1 + cos(pi step / total)) / 2``, per step down to 0. ``onecycle``: a cosine
    warm-up from ``base / 25`` over the first 30% of the steps, then a cosine decay to ``base / 25e4``
    (torch's OneCycleLR without momentum cycling). ``none``: ``base``.

    ``warmup`` (a fraction of the steps, ``0 <= warmup < 1``; ``cosine`` and ``none`` only, onecycle
    has its own): the first ``w = round(warmup total)`` steps ramp up linearly, ``base (step + 1) / w``,
    and the schedule then runs over the remaining ``total - w`` steps as if they were all of them
    (cosine: ``base (1 + cos(pi (step - w) / (total - w))) / 2``). ``warmup = 0`` is the schedule alone.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {warmup!r}")
    if warmup and schedule == "onecycle":
        raise ValueError("the onecycle schedule has its own warm-up (30% of the steps): use warmup 0")
    warm = round(warmup * total)
    if step < warm:
        return base * (step + 1) / warm
    step, total = step - warm, total - warm
    if schedule == "none":
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    start, end = base / 25.0, base / 25.0 / 1e4
    warm = max(1, round(0.3 * total))
    if step < warm:
        return start + (base - start) * 0.5 * (1.0 - math.cos(math.pi * step / warm))
    t = min(1.0, (step - warm) / max(1, total - warm))
    return end + (base - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def show_bars(progress: bool) -> bool:
    """Whether to draw tqdm progress bars: asked for (``progress``) and stderr, where tqdm draws them, is
    a terminal. In a log file a bar is a stream of carriage returns (hundreds of kB per run), so there
    the commands write one line per epoch instead."""
    isatty = getattr(sys.stderr, "isatty", None)
    return progress and callable(isatty) and bool(isatty())


def _diverged(label: str, what: str, value: str, where: str, advice: str) -> TrainingDivergedError:
    head = f"{label}: " if label else ""
    return TrainingDivergedError(f"{head}{what} became {value} {where}: {advice}")


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: _Loader,
    step: StepFn,
    *,
    epochs: int,
    lr: float,
    schedule: str = "cosine",
    warmup: float = 0.0,
    start_epoch: int = 0,
    start_step: int = 0,
    stop_after_epoch: int | None = None,
    time_cap: float | None = None,
    reduce: Callable[[list[float]], list[float]] | None = None,
    callbacks: Sequence[Callback] = (),
    advice: Callable[[int], str] = lambda _epoch: "lower the learning rate",
    label: str = "",
    progress: bool = False,
) -> FitResult:
    """Train ``model`` for epochs ``start_epoch .. epochs - 1`` of ``loader`` with ``step``; see the module
    docstring.

    ``model`` is what the step calls (a DDP or compiled wrapper as well). The learning rate of step ``s``
    is ``lr_at(s, epochs * len(loader), lr, schedule, warmup)``; ``start_step`` is the step counter at
    ``start_epoch`` (resume). ``time_cap``: seconds of training after which no further step starts (each
    step is timed from setting the learning rate to the end of the optimiser step, CUDA synchronised after
    it when a cap is set), so the first step always runs. ``reduce`` sums a list of
    floats over processes (DDP; default: this process only). ``advice(epoch)`` (0-based epoch) ends the
    message of a :class:`TrainingDivergedError`, ``label`` starts it (and names the progress bar, drawn
    when ``progress`` is on and stderr is a terminal: :func:`show_bars`; nothing is written per step
    otherwise).
    ``stop_after_epoch``: return before that epoch as if the process had stopped there.
    """
    batches = len(loader)
    total = epochs * batches
    if total == 0:
        raise ValueError(f"nothing to train: {epochs} epochs of {batches} batches")
    lr_at(0, total, lr, schedule, warmup)  # an unknown schedule or a bad warm-up fails before any step
    bars = show_bars(progress)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sync = time_cap is not None and device.type == "cuda"
    sum_over = reduce if reduce is not None else (lambda values: values)
    set_epoch = getattr(loader, "set_epoch", None)
    result = FitResult(epochs=start_step / batches, step=start_step, seconds=0.0)
    for epoch in range(start_epoch, epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            result.stopped = "stop_after_epoch"
            return result
        if set_epoch is not None:
            set_epoch(epoch)
        for cb in callbacks:
            cb.on_epoch_start(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        sums: dict[str, Tensor] = {}
        seen = 0
        current_lr = lr
        desc = f"{label + ' ' if label else ''}epoch {epoch + 1}/{epochs}"
        bar = tqdm(loader, desc=desc, leave=False, disable=not bars)
        try:
            for i, batch in enumerate(bar):
                if time_cap is not None and result.seconds >= time_cap:
                    result.epochs = result.step / batches
                    result.stopped = "time cap"
                    return result
                t_step = time.perf_counter()
                current_lr = lr_at(result.step, total, lr, schedule, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                try:
                    out = step(model, batch)
                    require_finite(out.loss.detach(), "the training loss")
                except _NonFinite as err:
                    where = f"at step {result.step + 1} (epoch {epoch + 1})"
                    raise _diverged(label, err.what, err.value, where, advice(epoch)) from None
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                for cb in callbacks:
                    cb.before_optimizer_step(model, optimizer, result.step)
                optimizer.step()
                for cb in callbacks:
                    cb.after_optimizer_step(model, optimizer, result.step)
                if sync:
                    torch.cuda.synchronize(device)
                result.seconds += time.perf_counter() - t_step
                result.step += 1
                n = len(batch[0])
                loss_sum += out.loss.detach().double() * n
                for key, value in out.stats.items():
                    sums[key] = sums[key] + value.detach() if key in sums else value.detach().clone()
                seen += n
                if bars and i % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{current_lr:.2e}")
        finally:
            bar.close()
        keys = list(sums)
        totals = sum_over([loss_sum.item(), float(seen), *(float(sums[k].item()) for k in keys)])
        epoch_loss = totals[0] / totals[1]
        if not math.isfinite(epoch_loss):
            raise _diverged(
                label, "the training loss", f"{epoch_loss}", f"in epoch {epoch + 1}", advice(epoch)
            )
        seconds = time.perf_counter() - t0
        result.epochs = result.step / batches
        done = EpochResult(
            epoch=epoch + 1,
            step=result.step,
            loss=epoch_loss,
            stats=dict(zip(keys, totals[2:], strict=True)),
            samples=int(totals[1]),
            lr=current_lr,
            seconds=seconds,
        )
        result.history.append(done)
        for cb in callbacks:
            cb.on_epoch_end(done)
    return result


def classification_step(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    channels_last: bool = False,
) -> StepFn:
    """The step of a classifier on ``(x, y)`` batches: ``loss_fn(model(x).float(), y)``, counting the
    ``correct`` predictions.

    The forward pass runs under ``autocast()`` (bf16 autocast on CUDA, say), on ``x`` in channels-last
    layout when ``channels_last``; the loss sees float32 logits. NaN or Inf logits on the CPU stop
    training as diverged (:func:`require_finite`) before the loss, whose own input check would
    report them as bad input.
    """

    def step(model: nn.Module, batch: Sequence[Tensor]) -> StepOutput:
        x, y = batch[0], batch[1]
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        require_finite(logits.detach(), "the logits")
        loss = loss_fn(logits.float(), y)
        return StepOutput(loss, {"correct": (logits.detach().argmax(dim=1) == y).sum()})

    return step
