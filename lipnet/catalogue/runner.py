"""Training every method of every task under one budget (the ``lipnet catalogue`` command:
:mod:`lipnet.cli.catalogue`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, Protocol, TypeGuard

import torch
from torch import nn

from certify import radius
from certify.bounds import lipschitz_bound
from lipnet.catalogue.report import CatalogueRow
from lipnet.catalogue.tasks import TASKS, CatalogueTask, TaskData, TaskSettings
from lipnet.data import DeviceLoader
from lipnet.training.loop import fit

__all__ = [
    "DEFAULT_EPS",
    "FULL",
    "QUICK",
    "available_methods",
    "order",
    "raw_bound",
    "run_catalogue",
    "settings_key",
    "train_method",
]

#: The catalogue's radii, :data:`certify.radius.SMALL_EPS` (its table has no column at 1, which no row of
#: it certifies).
DEFAULT_EPS: tuple[float, ...] = radius.SMALL_EPS

#: The default budget per task (``lipnet catalogue``): the Fashion-MNIST recipe (Adam 8e-3, 10% linear
#: warm-up then cosine; zero biases, every lipnet layer's init), tau 10, on ``shapes10`` at difficulty 0.5,
#: 10,000 training images for 5 epochs. Measured on the classification baseline (1,000 test images): at
#: difficulty 1 it reaches 40% clean, at 0.5 65% (tau 5: 61% clean, 23% certified at 36/255 instead of
#: 13%). The whole table: 21 minutes of CPU time on one thread (44.7 min wall-clock on the loaded shared
#: 2-core machine; docs/catalogue.md).
#: Counts are images (a MIL bag of 4 counts 4; 16 bags a batch, 64 images as elsewhere).
FULL: dict[str, TaskSettings] = {
    name: TaskSettings(
        n_train=10_000,
        n_test=1200 if name == "mil" else 1000,
        epochs=5,
        lr=8e-3,
        tau=10.0,
        batch_size=16 if name == "mil" else 64,
        width=16,
        warmup=0.1,
        difficulty=0.5,
    )
    for name in ("classification", "attributes", "multitask", "mil", "localisation", "scale", "cluttered")
}
#: ``--quick``: a smoke run of the whole pipeline (the suite runs it).
QUICK: dict[str, TaskSettings] = {name: TaskSettings(64, 32, 1, 1e-2, 2.0, 16, 8) for name in FULL}


def available_methods(task: str) -> list[str]:
    """The baseline and every attention method of ``task``, in table order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {list(TASKS)}")
    return TASKS[task].methods()


def settings_key(settings: TaskSettings, seed: int, eps: Sequence[float], attack: dict[str, Any]) -> str:
    """The identity of a row's budget: a finished row with the same key is not trained again."""
    return json.dumps(
        {**asdict(settings), "seed": seed, "eps": [radius.format_eps(e) for e in eps], "attack": attack},
        sort_keys=True,
    )


class _Normalizing(Protocol):
    """A module with a ``normalize`` switch (it divides its output by its own bound when on)."""

    normalize: bool


def _normalizing(module: nn.Module) -> TypeGuard[_Normalizing]:
    """Whether ``module`` has a ``normalize`` switch, and it is on."""
    return getattr(module, "normalize", None) is True  # a bool that is on (bool has no subclasses)


def raw_bound(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """The network's bound with every ``normalize`` switch off: the modules' own, unnormalised constants."""
    switched = [m for m in model.modules() if _normalizing(m)]
    try:
        for m in switched:
            m.normalize = False
        return lipschitz_bound(model, input_shape)
    finally:
        for m in switched:
            m.normalize = True


def train_method(
    task: CatalogueTask, method: str, model: nn.Module, train: TaskData, settings: TaskSettings, seed: int
) -> tuple[float, dict[str, Any]]:
    """Train ``model`` with the task's step for ``method`` (:meth:`CatalogueTask.step`) through the one fit
    loop: Adam with a per-step linear warm-up over the fraction ``settings.warmup`` of the steps, then a
    cosine decay to 0. Returns (the wall-clock seconds of the epochs, the task's training state).

    A loss that becomes NaN or Inf raises :class:`~lipnet.training.loop.TrainingDivergedError`.
    """
    state = task.init_state(method, model, train, settings)
    state["train"] = train
    loader = DeviceLoader(train.dataset, settings.batch_size, shuffle=True, seed=seed, targets=train.targets)
    fitted = fit(
        model,
        torch.optim.Adam(model.parameters(), lr=settings.lr),
        loader,
        task.step(method, state),
        epochs=settings.epochs,
        lr=settings.lr,
        schedule="cosine",
        warmup=settings.warmup,
        callbacks=[task.callback(method, state)],
        advice=lambda _epoch: "lower --lr",
        label=f"{task.name}/{method}",
    )
    model.eval()
    return sum(epoch.seconds for epoch in fitted.history), state


def run_catalogue(
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    *,
    settings: dict[str, TaskSettings] | None = None,
    eps: Sequence[float] = DEFAULT_EPS,
    attack: str = "pgd",
    attack_n: int = 100,
    attack_steps: int = 20,
    seed: int = 0,
    done: Sequence[CatalogueRow] = (),
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[CatalogueRow], None] | None = None,
) -> list[CatalogueRow]:
    """Train and evaluate each method on its task with the task's budget, data and seed.

    ``methods``/``tasks`` filter the table (``None``: everything available). Rows of ``done`` whose
    method, task and :func:`settings_key` match are kept instead of being trained again (resume).
    """
    budget = FULL if settings is None else settings
    chosen_tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in chosen_tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks: {list(TASKS)}")
    everything = {m for t in TASKS for m in TASKS[t].methods()}
    if methods is not None:
        missing = [m for m in methods if m not in everything]
        if missing:
            raise ValueError(f"method(s) {missing} not available; available: {sorted(everything)}")
    if not eps or any(not (e > 0 and math.isfinite(e)) for e in eps):
        raise ValueError(f"eps must be a non-empty list of finite radii > 0, got {list(eps)}")
    if attack not in ("auto", "autoattack", "pgd"):
        raise ValueError(f"unknown attack {attack!r}: choose auto, autoattack or pgd")
    attack_cfg = {"name": attack, "n": int(attack_n), "steps": int(attack_steps)}
    finished = {(r.method, r.task, r.settings): r for r in done}
    rows: list[CatalogueRow] = []
    for task_name in chosen_tasks:
        task = TASKS[task_name]
        todo = [m for m in task.methods() if methods is None or m in methods]
        if not todo:
            continue
        s = budget[task_name]
        key = settings_key(s, seed, eps, attack_cfg)
        data: tuple[TaskData, TaskData] | None = None
        for method in todo:
            if (method, task_name, key) in finished:
                rows.append(finished[(method, task_name, key)])
                if progress is not None:
                    progress(f"[{task_name}] {method}: already in the output folder, kept")
                continue
            if data is None:
                data = (
                    task.load("train", s.n_train, seed, s.difficulty),
                    task.load("test", s.n_test, seed, s.difficulty),
                )
            train, test = data
            if progress is not None:
                progress(
                    f"[{task_name}] {method}: training ({s.epochs} epochs, {len(train.dataset)} samples)"
                )
            torch.manual_seed(seed)
            model = task.build(method, s, train)
            seconds, state = train_method(task, method, model, train, s, seed)
            ev = task.evaluate(method, model, test, eps, attack_cfg, state)
            row = CatalogueRow(
                method=method,
                task=task_name,
                metric=ev.metric,
                metric_value=ev.metric_value,
                clean_accuracy=ev.clean_accuracy,
                certified=ev.certified,
                robust_accuracy=ev.robust_accuracy,
                attack=f"{attack}-{attack_steps}" if ev.robust_accuracy is not None else "",
                lipschitz_raw=raw_bound(model, test.input_shape),
                lipschitz=ev.lipschitz,
                params=sum(p.numel() for p in model.parameters()),
                train_seconds=seconds,
                settings=key,
                details=json.dumps(ev.details, sort_keys=True),
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if progress is not None:
                cert = " ".join(f"{k}={v:.3f}" for k, v in row.certified.items())
                progress(
                    f"[{task_name}] {method}: {row.metric}={row.metric_value:.4f} "
                    f"clean={row.clean_accuracy:.4f} "
                    f"certified {cert} L_raw={row.lipschitz_raw:.4g} ({seconds:.0f} s)"
                )
    return rows


def order(rows: Sequence[CatalogueRow]) -> list[CatalogueRow]:
    """Table order: tasks as in :data:`TASKS`, the baseline first, then the methods in task order."""
    rank = {(t, m): (i, j) for i, t in enumerate(TASKS) for j, m in enumerate(TASKS[t].methods())}
    return sorted(rows, key=lambda r: rank.get((r.task, r.method), (len(rank), 0)))
