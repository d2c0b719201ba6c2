"""Optional TensorBoard logging of a run (``--set log.tensorboard=true``; the ``tensorboard`` extra).

:class:`TensorBoardLogger` is a :class:`~lipnet.training.loop.Callback` of the fit loop that writes event
files into ``<run>/tensorboard`` beside ``metrics.jsonl`` (rank 0 only under DDP). On the x axis of
every curve is the optimiser step counter. Tags:

* per optimiser step ``s`` (0-based, logged at step ``s``): ``step/loss``, the training loss of the
  step's batch (rank 0's batch under DDP), and ``step/lr``, the learning rate of the step;
* per epoch, at the step count after it: ``epoch/loss`` (the epoch's mean training loss),
  ``epoch/train_acc``, ``epoch/test_acc``, ``epoch/lipschitz`` (the sound bound of the run's metrics
  row, computed once per epoch, never per step) and, with ``log.certify_n > 0``,
  ``epoch/certified_acc@<eps>`` for each eps of ``certify.eps`` (``epoch/certified_acc@36/255``):
  :func:`certify.certify` on the first ``certify_n`` test images, the rule of the end-of-run
  certification.

The per-step losses are kept as device tensors and read in one transfer every
:data:`FLUSH_STEPS` steps and at the end of each epoch, so that logging costs no device
synchronisation per step.

Resume: the writer opens with ``purge_step`` at the checkpoint's step count, so TensorBoard drops the
events that a killed process wrote after its last checkpoint (they are trained again), and the
checkpoint's epoch row (purged with them, being logged at that step) is logged again from the
checkpoint's history, its certified accuracy from the checkpoint's weights. A resumed run's curves
hold each step once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import certify
from certify.radius import format_eps
from lipnet import data
from lipnet.training.config import ConfigError
from lipnet.training.loop import Callback, EpochResult, StepFn, StepOutput

__all__ = ["FLUSH_STEPS", "TensorBoardLogger", "require_tensorboard", "tensorboard_available"]

#: Per-step scalars are read from the device and written every this many steps (and at epoch ends).
FLUSH_STEPS = 50


def tensorboard_available() -> bool:
    """Whether ``tensorboard`` imports (the ``tensorboard`` extra; ``torch.utils.tensorboard`` needs it)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorboard() -> None:
    """Raise :class:`~lipnet.training.config.ConfigError` (one line) when ``tensorboard`` is missing."""
    if not tensorboard_available():
        raise ConfigError(
            "log.tensorboard=true needs the tensorboard package: pip install 'lipnet[tensorboard]' "
            "(or set log.tensorboard=false)"
        )


def _first(loader: data.DeviceLoader, n: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The first ``n`` samples of ``loader``."""
    left = n
    for x, y in loader:
        if left <= 0:
            return
        yield x[:left], y[:left]
        left -= len(y)


class TensorBoardLogger(Callback):
    """Writes the tags of the module docstring into ``log_dir`` (see there for resume).

    ``history`` is the run's list of metrics rows, to which the run's epoch recorder (a callback
    before this one) appends each epoch's row; ``model`` is the bare model (not a DDP or compiled
    wrapper), certified in eval mode on the first ``certify_n`` samples of ``test_ds`` at each eps of
    ``eps`` (``certify_n = 0``: no certified-accuracy curves). ``start_step`` is the step counter the
    fit starts from; ``resume`` says whether the run continues from a checkpoint.
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        model: nn.Module,
        history: list[dict[str, Any]],
        test_ds: Any,
        eps: Sequence[float],
        certify_n: int,
        batch_size: int,
        device: torch.device,
        start_step: int,
        resume: bool,
    ) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.model, self.history, self.eps = model, history, list(eps)
        self.test_loader = data.DeviceLoader(test_ds, batch_size, device=device)
        self.certify_n = min(certify_n, len(test_ds))
        self._pending: list[tuple[int, Tensor, float]] = []
        self._loss: Tensor | None = None
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step if resume else None)
        if resume and history:
            # the checkpoint's epoch was purged with the steps after it (it is logged at start_step)
            self._log_epoch(history[-1])

    def watch(self, step: StepFn) -> StepFn:
        """``step`` that also hands its loss to this logger (for ``step/loss``)."""

        def watched(model: nn.Module, batch: Sequence[Tensor], /) -> StepOutput:
            out = step(model, batch)
            self._loss = out.loss.detach()
            return out

        return watched

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self._loss is not None:
            self._pending.append((step, self._loss, float(optimizer.param_groups[0]["lr"])))
            self._loss = None
        if len(self._pending) >= FLUSH_STEPS:
            self._flush()

    def on_epoch_end(self, result: EpochResult) -> None:
        self._flush()
        row = self.history[-1] if self.history else None
        if row is None or int(row["step"]) != result.step:
            raise RuntimeError("TensorBoardLogger must come after the run's epoch recorder in the callbacks")
        self._log_epoch(row)

    def close(self) -> None:
        """Write what is pending and close the event file."""
        self._flush()
        self.writer.close()

    def _flush(self) -> None:
        if not self._pending:
            return
        losses = torch.stack([loss.float() for _, loss, _ in self._pending]).tolist()  # one transfer
        for (step, _, lr), loss in zip(self._pending, losses, strict=True):
            self.writer.add_scalar("step/loss", loss, step)
            self.writer.add_scalar("step/lr", lr, step)
        self._pending.clear()
        self.writer.flush()

    def _log_epoch(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key in ("loss", "train_acc", "test_acc", "lipschitz"):
            self.writer.add_scalar(f"epoch/{key}", float(row[key]), step)
        for e, acc in self._certified().items():
            self.writer.add_scalar(f"epoch/certified_acc@{format_eps(e)}", acc, step)
        self.writer.flush()

    def _certified(self) -> dict[float, float]:
        if self.certify_n == 0:
            return {}
        # certify.certify runs the model in eval mode and restores its mode
        batches = _first(self.test_loader, self.certify_n)
        return certify.certify(self.model, batches, eps=self.eps, progress=False).certified_accuracy
