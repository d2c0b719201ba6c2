"""``lipnet catalogue``: train and certify every attention method on its task; csv, md and png.

The table is resumable: the rows already in ``--out``'s ``catalogue.csv`` with the same budget are kept
(:func:`lipnet.catalogue.runner.run_catalogue`), and the outputs are rewritten after every row
(:func:`lipnet.catalogue.report.write_outputs`).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lipnet.catalogue.report import CatalogueRow, read_rows, write_outputs
from lipnet.catalogue.runner import DEFAULT_EPS, FULL, QUICK, order, run_catalogue
from lipnet.catalogue.tasks import TASKS
from lipnet.cli.argtypes import (
    check_output_path,
    name_list,
    non_negative_int,
    positive_float,
    positive_int,
    unit_fraction,
)

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``lipnet catalogue`` for parsed ``args``."""
    check_output_path(args.out, "--out", folder=True)
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
            "warmup": args.warmup,
            "difficulty": args.difficulty,
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
        write_outputs(order([*kept, *done]), DEFAULT_EPS, out, command, plot=False)

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
    table = order([*rows, *(r for r in previous if (r.method, r.task) not in fresh)])
    for path in write_outputs(table, DEFAULT_EPS, out, command):
        print(f"wrote {path}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``catalogue`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("catalogue", help="train and certify every attention method; csv, md and png")
    p.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, two methods per task")
    p.add_argument("--out", default="runs/catalogue", help="output folder (default runs/catalogue)")
    p.add_argument("--methods", type=name_list, help="subset, e.g. baseline,SqueezeExcitation")
    p.add_argument("--tasks", type=name_list, help="subset, e.g. classification,mil")
    p.add_argument("--n-train", type=positive_int, help="training images per task (all tasks)")
    p.add_argument("--n-test", type=positive_int, help="test images per task (all tasks)")
    p.add_argument("--epochs", type=positive_int, help="epochs per method (all tasks)")
    p.add_argument("--lr", type=positive_float, help="Adam learning rate (all tasks)")
    p.add_argument("--tau", type=positive_float, help="tau, which multiplies the logits (all tasks)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (all tasks)")
    p.add_argument("--width", type=positive_int, help="backbone width, even (all tasks)")
    p.add_argument(
        "--warmup",
        type=unit_fraction,
        help="fraction of the steps of linear learning-rate warm-up, in [0, 1)",
    )
    p.add_argument(
        "--difficulty",
        type=unit_fraction,
        help="shapes10 difficulty setting of every task's images, in [0, 1]",
    )
    p.add_argument("--attack", choices=["auto", "autoattack", "pgd"], help="attack (default pgd)")
    p.add_argument("--attack-n", type=non_negative_int, help="test samples attacked (default 100)")
    p.add_argument("--attack-steps", type=positive_int, help="PGD steps (default 20)")
    p.add_argument(
        "--restart",
        action="store_true",
        help="train the selected rows again even where the output folder has them (other rows are kept)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no per-method lines")
    p.set_defaults(func=run)
    return p
