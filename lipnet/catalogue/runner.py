"""Training every method of every task under one budget, and the ``lipnet catalogue`` command."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certify.bounds import lipschitz_bound
from lipnet.catalogue.report import CatalogueRow, read_rows, write_outputs
from lipnet.catalogue.tasks import TASKS, CatalogueTask, TaskData, TaskSettings
from lipnet.data import DeviceLoader
from lipnet.runs import eps_label
from lipnet.train import lr_at

__all__ = [
    "DEFAULT_EPS",
    "FULL",
    "QUICK",
    "available_methods",
    "raw_bound",
    "run",
    "run_catalogue",
    "settings_key",
    "train_method",
]

DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255)

#: The default budget per task (``lipnet catalogue``): chosen so that the baseline clearly learns on
#: every task and the whole table fits in about 45 minutes on 2 CPU cores. Counts are images (a MIL
#: bag of 4 counts 4).
FULL: dict[str, TaskSettings] = {
    "classification": TaskSettings(4000, 1000, 5, 1e-2, 2.0, 64, 16),
    "attributes": TaskSettings(4000, 1000, 5, 1e-2, 2.0, 64, 16),
    "multitask": TaskSettings(4000, 1000, 5, 1e-2, 2.0, 64, 16),
    "mil": TaskSettings(4000, 1200, 5, 1e-2, 2.0, 16, 16),
    "localisation": TaskSettings(4000, 1000, 5, 1e-2, 2.0, 64, 16),
    "scale": TaskSettings(4000, 1000, 5, 1e-2, 2.0, 64, 16),
    "cluttered": TaskSettings(4000, 1000, 5, 1e-2, 2.0, 64, 16),
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
        {**asdict(settings), "seed": seed, "eps": [eps_label(e) for e in eps], "attack": attack},
        sort_keys=True,
    )


def raw_bound(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """The network's bound with every ``normalize`` switch off: the modules' own, unnormalised constants."""
    switched = [m for m in model.modules() if isinstance(getattr(m, "normalize", None), bool) and m.normalize]
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
    """Adam with a per-step cosine schedule, the task's loss for ``method``; returns (seconds, state)."""
    state = task.init_state(method, model, train, settings)
    state["train"] = train
    loader = DeviceLoader(train.dataset, settings.batch_size, shuffle=True, seed=seed, targets=train.targets)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    total = settings.epochs * len(loader)
    step = 0
    start = time.perf_counter()
    model.train()
    for epoch in range(settings.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, settings.lr, "cosine")
            loss = task.loss(method, model, batch, state)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{task.name}/{method}: training loss became {float(loss)} at step {step}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        task.end_epoch(method, state)
    model.eval()
    return time.perf_counter() - start, state


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
                data = (task.load("train", s.n_train, seed), task.load("test", s.n_test, seed))
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


def _order(rows: Sequence[CatalogueRow]) -> list[CatalogueRow]:
    """Table order: tasks as in :data:`TASKS`, the baseline first, then the methods in task order."""
    rank = {(t, m): (i, j) for i, t in enumerate(TASKS) for j, m in enumerate(TASKS[t].methods())}
    return sorted(rows, key=lambda r: rank.get((r.task, r.method), (len(rank), 0)))


def run(args: argparse.Namespace) -> int:
    """The ``lipnet catalogue`` command."""
    quick = bool(args.quick)
    base = QUICK if quick else FULL
    overrides = {
        k: v
        for k, v in {
            "n_train": args.n_train,
            "n_test": args.n_test,
            "epochs": args.epochs,
            "lr": args.lr,
            "tau": args.tau,
            "batch_size": args.batch_size,
            "width": args.width,
        }.items()
        if v is not None
    }
    settings = {t: replace(s, **overrides) for t, s in base.items()}
    tasks = args.tasks
    methods = args.methods
    if quick and methods is None:
        # Two methods of each task (the baseline and the first attention method) keep the suite fast.
        methods = sorted({m for t in TASKS for m in TASKS[t].methods()[:2]})
    attack = args.attack or "pgd"
    # --quick attacks every test sample, so its PGD and certified accuracies are over the same set.
    attack_n = args.attack_n if args.attack_n is not None else (10_000 if quick else 100)
    attack_steps = args.attack_steps or (5 if quick else 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        previous = read_rows(out / "catalogue.csv")
    except ValueError:
        if not args.restart:
            raise
        previous = []
    say = None if args.quiet else (lambda line: print(line, flush=True))
    command = "lipnet catalogue " + " ".join(
        ["--quick"] * quick
        + [f"--{k.replace('_', '-')} {v}" for k, v in overrides.items()]
        + ([f"--tasks {','.join(tasks)}"] if tasks else [])
        + ([f"--methods {','.join(args.methods)}"] if args.methods else [])
        + [
            f"--attack {attack}",
            f"--attack-n {attack_n}",
            f"--attack-steps {attack_steps}",
            f"--seed {args.seed}",
        ]
    )
    done: list[CatalogueRow] = []

    def keep(row: CatalogueRow) -> None:
        # Written after every row, so an interrupted run loses at most the row in progress.
        done.append(row)
        kept = [r for r in previous if (r.method, r.task) not in {(d.method, d.task) for d in done}]
        write_outputs(_order([*kept, *done]), DEFAULT_EPS, out, command, plot=False)

    rows = run_catalogue(
        methods,
        tasks,
        settings=settings,
        attack=attack,
        attack_n=attack_n,
        attack_steps=attack_steps,
        seed=args.seed,
        # --restart trains the selected rows again; the table keeps the rows of the others.
        done=[] if args.restart else previous,
        progress=say,
        on_row=keep,
    )
    fresh = {(r.method, r.task) for r in rows}
    table = _order([*rows, *(r for r in previous if (r.method, r.task) not in fresh)])
    for path in write_outputs(table, DEFAULT_EPS, out, command):
        print(f"wrote {path}")
    return 0
