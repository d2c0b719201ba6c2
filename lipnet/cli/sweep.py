"""``lipnet sweep``: one run per value of a loss parameter; csv, md and png
(:func:`lipnet.training.sweep.run_sweep`).

The parameter is any argument the configured loss declares sweepable (:func:`lipnet.losses.sweepable`):
``--param gamma --values 0,1,2`` (``--values`` alone sweeps the config's ``sweep.param``), or the option
named after it, ``--gammas 0,1,2``. One such option is made for every parameter some registered loss
declares (:func:`lipnet.losses.declared_parameters`), so ``--taus``, ``--margins`` and ``--alphas`` are
among them, and a parameter a loss declares later gets its option without an edit here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lipnet import losses
from lipnet.cli.argtypes import check_output_path, float_list, non_negative_int, positive_int
from lipnet.cli.train import add_config_options, apply_threads, check_buildable, config_from_args, epoch_log
from lipnet.training.config import ConfigError
from lipnet.training.sweep import run_sweep, values_flag

__all__ = ["add_parser", "run"]


def _dest(param: str) -> str:
    return f"values_of_{param}"


def run(args: argparse.Namespace) -> int:
    """Run ``lipnet sweep`` for parsed ``args``; exit code 1 when a certificate was broken."""
    cfg = config_from_args(args)
    if args.attack is not None:
        cfg.sweep.attack = args.attack
    if args.attack_n is not None:
        cfg.sweep.attack_n = args.attack_n
    cfg.validate()
    check_buildable(cfg)
    named = [
        (p, getattr(args, _dest(p)))
        for p in losses.declared_parameters()
        if getattr(args, _dest(p)) is not None
    ]
    if args.param is not None and named:
        flag = values_flag(named[0][0])
        raise ConfigError(f"--param names the parameter of --values; {flag} names its own (give one of them)")
    if args.values is not None:
        param, values = args.param or cfg.sweep.param, args.values
    elif named:
        param, values = named[0]
    else:
        param, values = args.param or cfg.sweep.param, cfg.sweep.values
    out = args.out or cfg.out or str(Path("runs") / f"{Path(args.config).stem}-sweep")
    check_output_path(out, "--out", folder=True)
    apply_threads(args)
    result = run_sweep(cfg, param, values, out, progress=not args.quiet, log=epoch_log, jobs=args.jobs)
    print(result.md_path.read_text(encoding="utf-8"))
    print(f"wrote {result.csv_path}, {result.md_path}" + (f", {result.png_path}" if result.png_path else ""))
    return 0 if not result.violations else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sweep`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("sweep", help="train one model per loss parameter value; csv, png and md")
    add_config_options(p)
    group = p.add_mutually_exclusive_group()
    for param in losses.declared_parameters().values():
        meaning = f" ({param.meaning})" if param.meaning else ""
        group.add_argument(
            values_flag(param.name),
            dest=_dest(param.name),
            type=float_list,
            metavar="V1,V2",
            help=f"values of loss.{param.name}{meaning}, one run each, e.g. 0.1,1,10",
        )
    group.add_argument(
        "--values", type=float_list, metavar="V1,V2", help="values of --param (default: sweep.param)"
    )
    p.add_argument(
        "--param",
        metavar="NAME",
        help="the loss argument --values sweeps: any the loss declares sweepable (default: sweep.param)",
    )
    p.add_argument("--out", help="sweep folder (default: runs/<config name>-sweep)")
    p.add_argument("--attack", choices=["auto", "pgd", "autoattack"], help="empirical attack")
    p.add_argument("--attack-n", type=non_negative_int, help="test images attacked per value (0: no attack)")
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="train up to N values at once, each in its own process with threads // N torch threads "
        "(default 1: one after the other)",
    )
    p.set_defaults(func=run)
    return p
