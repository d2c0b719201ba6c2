"""What every task of the catalogue has: its budget, its data, its evaluation, and the base class.

A task (one module of this package each, collected in :data:`lipnet.catalogue.tasks.TASKS`) knows

* its data (an :class:`~lipnet.data.ImageDataset` plus extra per-sample targets, batched together by
  :class:`~lipnet.data.DeviceLoader`), built from ``shapes10`` by :mod:`lipnet.catalogue.data`,
* its methods: the :mod:`lipnet.attention` classes that belong to it and the plain ``baseline`` of the
  same size, each with the loss of its paper, all on tau-scaled logits; the loss of one batch is the
  task's step of the one fit loop (:meth:`CatalogueTask.step`, :func:`lipnet.training.loop.fit`),
* how a trained network is evaluated: the task metric of the papers, clean accuracy, certified
  accuracy at each eps (:func:`certify.certify` for single-label decisions, or the documented
  per-task / per-attribute / per-pixel rule), and PGD accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import certify
import lipnet.attention as attention
from certify.attacks import empirical_robust_accuracy
from certify.bounds import lipschitz_bound
from certify.radius import format_eps
from lipnet.data import ImageDataset
from lipnet.data.shapes import SHAPES10_CLASSES, load_shapes10
from lipnet.losses import TauCrossEntropy
from lipnet.training.loop import Callback, EpochResult, StepFn, StepOutput

__all__ = [
    "BASELINE",
    "CatalogueTask",
    "Evaluation",
    "State",
    "TaskData",
    "TaskSettings",
    "attack_accuracy",
    "attention_class",
    "batched_logits",
    "classification_scores",
    "half_masks",
    "labelled",
    "one_hot_targets",
    "shapes_data",
]

BASELINE = "baseline"
#: Loss modules and training-time state of one training run (what ``init_state`` returns).
State = dict[str, Any]


@dataclass(frozen=True)
class TaskSettings:
    """The training budget of one task, the same for every method of the task.

    ``warmup``: the fraction of the optimiser steps over which the learning rate ramps up linearly before
    the cosine decay (:func:`lipnet.training.loop.lr_at`; 0: cosine from the first step). ``difficulty``:
    the ``shapes10`` difficulty setting the task's images are generated at (:mod:`lipnet.data.shapes`; the
    upper end of the per-image nuisance level, 1 the full data set, 0 clean shapes only).
    """

    n_train: int
    n_test: int
    epochs: int
    lr: float
    tau: float
    batch_size: int
    width: int
    warmup: float = 0.0
    difficulty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test", "epochs", "batch_size", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "tau"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name, upper in (("warmup", "1)"), ("difficulty", "1]")):
            value = getattr(self, name)
            inside = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
            if not inside or (name == "warmup" and value == 1):
                raise ValueError(f"{name} must be a number in [0, {upper}, got {value!r}")
        if self.width < 2 or self.width % 2:
            raise ValueError(
                f"width must be an even number >= 2 (GroupSort pairs channels), got {self.width}"
            )


@dataclass(eq=False)
class TaskData:
    """One split: the images and main labels, extra per-sample targets, and task-specific extras."""

    dataset: ImageDataset
    targets: tuple[Tensor, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.dataset.input_shape


@dataclass
class Evaluation:
    """What a task reports for one trained network (``certified`` keyed by eps label)."""

    metric: str
    metric_value: float
    clean_accuracy: float
    certified: dict[str, float]
    robust_accuracy: float | None
    lipschitz: float
    details: dict[str, Any]


def attention_class(name: str) -> Any:
    """The :mod:`lipnet.attention` class called ``name``."""
    return getattr(attention, name)


def batched_logits(model: nn.Module, x: Tensor, batch: int = 250) -> Tensor:
    """``model(x)`` in batches of ``batch``, without gradients."""
    with torch.no_grad():
        return torch.cat([model(xb) for xb in x.split(batch)])


def classification_scores(
    model: nn.Module, data: TaskData, eps: Sequence[float], attack: dict[str, Any]
) -> tuple[float, dict[str, float], float | None, float]:
    """Clean accuracy, certified accuracy at each eps (keyed by :func:`certify.radius.format_eps`), PGD
    accuracy and ``L``, the sound bound of the whole network.

    The certificate is :func:`certify.certify`'s, the one every command uses: the last-layer rule
    ``min_j margin_j / (L_body ||w_y - w_j||)`` when the network ends in a linear head (an
    ``nn.Sequential`` whose last child is an ``nn.Linear``, or a model with ``split_head``), else
    ``margin / (sqrt 2 L)``.
    """
    ds = data.dataset
    batches = zip(ds.images.split(250), ds.labels.split(250), strict=True)
    result = certify.certify(model, batches, eps=list(eps), progress=False)
    cert = {format_eps(e): result.certified_accuracy[e] for e in eps}
    lip = lipschitz_bound(model, ds.input_shape)
    return result.clean_accuracy, cert, attack_accuracy(model, ds.images, ds.labels, eps[0], attack), lip


def attack_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, attack: dict[str, Any]
) -> float | None:
    """Accuracy under ``attack`` (``{"name", "n", "steps"}``) at ``eps`` on the first ``attack["n"]``
    samples; ``None`` when ``n`` is 0."""
    n = min(int(attack["n"]), x.shape[0])
    if n == 0:
        return None
    return empirical_robust_accuracy(
        model, x[:n], y[:n], eps, attack=attack["name"], steps=int(attack["steps"])
    )


def one_hot_targets(labels: Tensor, k: int) -> Tensor:
    """Labels as float32 one-hot rows ``(N, k)``."""
    return F.one_hot(labels, k).to(torch.float32)


class CatalogueTask:
    """One task of the catalogue: data, methods (``baseline`` first), losses and evaluation."""

    name = ""
    metric = ""
    #: The baseline, then the :mod:`lipnet.attention` classes trained on this task, in table order.
    METHODS: tuple[str, ...] = ()

    def methods(self) -> list[str]:
        """:attr:`METHODS` as a list."""
        return list(self.METHODS)

    def load(self, split: str, n: int, seed: int, difficulty: float = 1.0) -> TaskData:
        """``n`` samples (images; bags count their instances) of ``split``, generated with ``seed`` from
        ``shapes10`` at the difficulty setting ``difficulty``."""
        raise NotImplementedError

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        raise NotImplementedError

    def init_state(self, method: str, model: nn.Module, train: TaskData, settings: TaskSettings) -> State:
        """Loss modules and training-time state of ``method`` (created once per training run)."""
        return {"ce": TauCrossEntropy(settings.tau)}

    def loss(self, method: str, model: nn.Module, batch: Sequence[Tensor], state: State) -> Tensor:
        """The loss of ``method`` on one batch ``(x, y, *targets)`` (tau-CE of the logits here)."""
        x, y = batch[0], batch[1]
        return state["ce"](model(x), y)

    def end_epoch(self, method: str, state: State) -> None:
        """Called after every epoch (epoch-level state such as DWA's loss history)."""

    def step(self, method: str, state: State) -> StepFn:
        """The fit loop's step of ``method`` (:func:`lipnet.training.loop.fit`): :meth:`loss` on a batch."""

        def step(model: nn.Module, batch: Sequence[Tensor]) -> StepOutput:
            return StepOutput(self.loss(method, model, batch, state))

        return step

    def callback(self, method: str, state: State) -> Callback:
        """The fit loop's callback of ``method``: :meth:`end_epoch` after every epoch."""
        return _EndEpoch(self, method, state)

    def evaluate(
        self,
        method: str,
        model: nn.Module,
        test: TaskData,
        eps: Sequence[float],
        attack: dict[str, Any],
        state: State,
    ) -> Evaluation:
        clean, cert, robust, lip = classification_scores(model, test, eps, attack)
        return Evaluation("accuracy", clean, clean, cert, robust, lip, {})


class _EndEpoch(Callback):
    def __init__(self, task: CatalogueTask, method: str, state: State) -> None:
        self.task, self.method, self.state = task, method, state

    def on_epoch_end(self, result: EpochResult) -> None:
        self.task.end_epoch(self.method, self.state)


def shapes_data(split: str, n: int, seed: int, difficulty: float = 1.0) -> TaskData:
    """``n`` ``shapes10`` images of ``split``, generated with ``seed`` at the setting ``difficulty``."""
    return TaskData(load_shapes10(split, n=n, seed=seed, difficulty=difficulty))


def labelled(
    images: Tensor, labels: Tensor, name: str, classes: Sequence[str] = SHAPES10_CLASSES
) -> ImageDataset:
    """An :class:`~lipnet.data.ImageDataset` of ``images`` with the ``shapes10`` class names."""
    return ImageDataset(images, labels, len(classes), list(classes), name)


def half_masks(masks: Tensor) -> Tensor:
    """Object masks at half resolution (a 2x2 window is foreground when at least half of it is)."""
    return F.avg_pool2d(masks[:, None].float(), 2)[:, 0] >= 0.5
