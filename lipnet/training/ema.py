"""An exponential moving average of the weights, as a callback of the one fit loop.

:class:`ExponentialMovingAverage` keeps a copy of the model (:attr:`ExponentialMovingAverage.average`)
whose parameters follow the trained ones: after optimiser step ``t`` (0-based, counted from the start of
training, so a resumed run continues the same sequence)

    d_t = min(decay, (1 + t) / (10 + t)),    a <- d_t a + (1 - d_t) w    for every parameter,

and whose buffers are copies of the trained model's (running statistics, sizes a layer has seen). The
ramp ``(1 + t) / (10 + t)`` (as TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``) keeps the
first steps from being dominated by the initial weights when the run is short compared with
``1 / (1 - decay)`` steps.

What is averaged is the *raw* parameters: a parametrized layer (Björck, AOL, Cayley, ...) applies its
constraint to the averaged raw weight, so the averaged model is built from the same 1-Lipschitz layers
as the trained one, and its certificate, computed by ``certify`` from its own weights like any other
model's, is sound. ``lipnet train`` evaluates, bounds, certifies and saves the averaged model
(:mod:`lipnet.training.run`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lipnet.training.loop import Callback

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage(Callback):
    """The moving average of ``model``'s parameters with decay ``decay`` (module docstring), updated after
    every optimiser step of :func:`~lipnet.training.loop.fit`.

    ``model`` is the module whose parameters the optimiser updates (not a DDP or compiled wrapper: the
    callback reads the tensors it was built with, whatever module the loop passes). The average starts
    as a copy of ``model`` as it is now, in eval mode, without gradients. On CPU the update is
    deterministic, so a run resumed from :meth:`state_dict` ends with the same average bit for bit.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise TypeError(f"decay must be a number, got {decay!r}")
        if not (math.isfinite(decay) and 0.0 < decay < 1.0):
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.model = model
        self.average = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self.average.parameters(), model.parameters(), strict=True))
        # the parameters averaged (floating point: all a model trains) and the buffers copied
        self._targets: list[Tensor] = [a for a, _ in pairs if a.is_floating_point()]
        self._sources: list[Tensor] = [p for a, p in pairs if a.is_floating_point()]
        self._target_buffers: list[Tensor] = list(self.average.buffers())
        self._source_buffers: list[Tensor] = list(model.buffers())

    def decay_at(self, step: int) -> float:
        """``d_t = min(decay, (1 + t) / (10 + t))`` of optimiser step ``t = step`` (0-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the current weights as after optimiser step ``step``."""
        if self._targets:
            # a <- a + (1 - d) (w - a), as torch.optim's foreach paths: one kernel per group of tensors of
            # one device and dtype, deterministic (the same on every run)
            torch._foreach_lerp_(self._targets, self._sources, 1.0 - self.decay_at(step))
        for target, source in zip(self._target_buffers, self._source_buffers, strict=True):
            target.copy_(source)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.update(step)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged model's ``state_dict`` (what a checkpoint stores)."""
        return self.average.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the average from :meth:`state_dict` (strict, as ``nn.Module.load_state_dict``)."""
        self.average.load_state_dict(state)
