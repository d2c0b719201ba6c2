"""``lipnet train``: train one model into a run folder, then certify it (:func:`lipnet.training.run.train`).

Also the options every config-driven command shares (``--config``, ``--set``, ``--device``,
``--threads``, ``--quiet``; :func:`add_config_options`), the config they give (:func:`config_from_args`),
the check that its model and loss can be built before any data is read (:func:`check_buildable`) and the
per-epoch output (:func:`epoch_log`), which ``lipnet sweep`` uses too.

Output: one line per epoch on stdout, flushed, in a terminal and in a log file alike; tqdm progress bars
on stderr only when it is a terminal, and not with ``--quiet``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lipnet.cli.argtypes import check_output_path, positive_int
from lipnet.training.build import build_loss
from lipnet.training.config import Config, ConfigError, apply_overrides, load_config
from lipnet.training.run import train
from lipnet.training.runs import RunFolder

__all__ = [
    "add_config_options",
    "add_parser",
    "apply_threads",
    "check_buildable",
    "config_from_args",
    "epoch_log",
    "run",
]


def add_config_options(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set KEY=VALUE`` (repeatable), ``--device``, ``--threads`` and ``--quiet``."""
    p.add_argument("--config", help="YAML config file (experiments/configs/*.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set loss.tau=10 --set optim.epochs=3 (YAML scalars)",
    )
    p.add_argument("--device", help="auto (default: CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars (the one line per epoch stays; bars are drawn only on a terminal anyway)",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads(--threads)`` when the option is given."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def epoch_log(line: str) -> None:
    """Print one progress line (an epoch's metrics) on stdout and flush it, so that a log file gets it
    at once; ``tqdm.write`` keeps a progress bar on the terminal intact."""
    tqdm.write(line)
    sys.stdout.flush()


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config of ``--config`` with the ``--set`` overrides and ``--device`` applied."""
    if args.config is None:
        raise ConfigError("give --config FILE (experiments/configs/*.yaml)")
    cfg = load_config(args.config, args.set)
    if args.device is not None:
        cfg.device = args.device
        cfg.validate()
    return cfg


def check_buildable(cfg: Config) -> None:
    """Reject a model or loss that cannot be built before any data is loaded (both are cheap to check)."""
    cfg.model.check()
    build_loss(cfg)


def _is_main_process() -> bool:
    # torchrun starts one process per device with RANK set; only rank 0 reports.
    return os.environ.get("RANK", "0") == "0"


def run(args: argparse.Namespace) -> int:
    """Run ``lipnet train`` for parsed ``args``."""
    if args.resume is not None:
        if args.out is not None and Path(args.out) != Path(args.resume):
            raise ConfigError("give either --resume RUN or --out DIR, not two different folders")
        if args.config is None:
            cfg = apply_overrides(RunFolder(args.resume).read_config(), args.set)
            if args.device is not None:
                cfg.device = args.device
                cfg.validate()
        else:
            cfg = config_from_args(args)
        cfg.out = str(args.resume)
    else:
        cfg = config_from_args(args)
        if args.out is not None:
            cfg.out = args.out
        elif cfg.out is None:
            cfg.out = str(Path("runs") / Path(args.config).stem)
        check_output_path(cfg.out, "--out", folder=True)
    check_buildable(cfg)
    apply_threads(args)
    result = train(cfg, resume=args.resume is not None, progress=not args.quiet, log=epoch_log)
    if _is_main_process():
        print(f"run folder: {result.run_dir}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("train", help="train one model into a run folder, then certify it")
    add_config_options(p)
    p.add_argument("--out", help="run folder (default: out in the config, else runs/<config name>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its last checkpoint")
    p.set_defaults(func=run)
    return p
