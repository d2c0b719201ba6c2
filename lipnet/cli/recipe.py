"""``lipnet bench recipe``: a base config and each recipe element toggled, trained on one budget
(:mod:`lipnet.bench.recipe`); ``recipe.csv`` and ``recipe.md`` in ``--out``, rewritten after every run.

    lipnet bench recipe --config experiments/configs/fmnist_convnet_s.yaml --epochs 3 --n-train 20000 \\
        --n-test 5000 --ablations warmup,ema,rownorm,optim.lr=1e-3 --seeds 0,1 --out runs/recipe

Bad arguments (an unknown ablation, one that does not apply to the config, an override the config
refuses) are refused before any data is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from lipnet.bench import device_label
from lipnet.bench.recipe import ABLATIONS, RecipeRow, bench_recipe, resolve_ablations, write_tables
from lipnet.cli.argtypes import check_output_path, name_list, positive_int, seed_list
from lipnet.cli.train import add_config_options, apply_threads, check_buildable, config_from_args, epoch_log
from lipnet.training.config import apply_overrides
from lipnet.training.devices import resolve_device

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``lipnet bench recipe`` for parsed ``args``."""
    base = config_from_args(args)
    check_buildable(base)
    ablations = resolve_ablations(base, args.ablations)
    for _, overrides in ablations:
        check_buildable(apply_overrides(base, overrides))  # each model and loss, before any data is read
    check_output_path(args.out, "--out", folder=True)
    apply_threads(args)
    epochs = args.epochs if args.epochs is not None else base.optim.epochs
    n_train = args.n_train if args.n_train is not None else base.data.n_train
    n_test = args.n_test if args.n_test is not None else base.data.n_test
    device = str(resolve_device(base.device))
    header = (
        f"# Recipe ablation: `{base.model.name}` on {base.data.name}, {epochs} epoch(s) on "
        f"{n_train if n_train is not None else 'all'} training images, certified on "
        f"{n_test if n_test is not None else 'all'} test images (certify.certify), seeds "
        f"{', '.join(str(s) for s in args.seeds)} (the same initialisation and data order per seed); "
        f"{device_label(device)}, torch {torch.__version__}\n\n"
        "Each row toggles one element of the base recipe (or applies one override); means over the seeds. "
        "Accuracies in %; mean radius: mean certified L2 radius (0 when misclassified); s/epoch: wall-clock "
        "of the training steps, comparable only within this table."
    )

    def write(rows: list[RecipeRow]) -> None:
        write_tables(args.out, rows, base.certify.eps, header)

    bench_recipe(
        base,
        ablations,
        out=args.out,
        epochs=args.epochs,
        n_train=args.n_train,
        n_test=args.n_test,
        seeds=args.seeds,
        progress=not args.quiet,
        log=epoch_log,
        on_rows=write,
    )
    print((Path(args.out) / "recipe.md").read_text(encoding="utf-8"))
    print(f"wrote {Path(args.out) / 'recipe.csv'}, {Path(args.out) / 'recipe.md'}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``recipe`` to the ``lipnet bench`` sub-commands ``subparsers``."""
    p = subparsers.add_parser(
        "recipe",
        help="train a base config and each recipe element toggled on one budget; recipe.csv/md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="named ablations (each toggled relative to the config):\n"
        + "\n".join(f"  {a.name:13s} {a.description}" for a in ABLATIONS.values()),
    )
    add_config_options(p)
    p.add_argument(
        "--ablations",
        type=name_list,
        help=(
            f"comma-separated: named elements ({', '.join(ABLATIONS)}), each toggled relative to the config, "
            "or section.key=value overrides (default: every named element that applies)"
        ),
    )
    p.add_argument("--epochs", type=positive_int, help="epochs per run (default: optim.epochs)")
    p.add_argument("--n-train", type=positive_int, help="first N training images (default: data.n_train)")
    p.add_argument("--n-test", type=positive_int, help="first N test images certified (default: data.n_test)")
    p.add_argument("--seeds", type=seed_list, default=[0], help="seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--out", default="runs/recipe", help="folder of recipe.csv, recipe.md and runs/")
    p.set_defaults(func=run)
    return p
