"""``lipnet train``: train one model into a run folder, then certify it (:func:`lipnet.training.run.train`).

Also the options every config-driven command shares (``--config``, ``--set``, ``--device``,
``--quiet``; :func:`add_config_options`), the config they give (:func:`config_from_args`) and the
check that its model and loss can be built before any data is read (:func:`check_buildable`), which
``lipnet sweep`` uses too.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lipnet.cli.argtypes import check_output_path
from lipnet.training.build import build_loss
from lipnet.training.config import Config, ConfigError, apply_overrides, load_config
from lipnet.training.run import train
from lipnet.training.runs import RunFolder

__all__ = ["add_config_options", "add_parser", "check_buildable", "config_from_args", "run"]


def add_config_options(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set KEY=VALUE`` (repeatable), ``--device`` and ``--quiet``."""
    p.add_argument("--config", help="YAML config file (experiments/configs/*.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set loss.tau=10 --set optim.epochs=3 (YAML scalars)",
    )
    p.add_argument("--device", help="auto (default: CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


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
    result = train(cfg, resume=args.resume is not None, progress=not args.quiet)
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
