"""``lipnet certify``: certify a run's checkpoint on its test set (:func:`lipnet.training.run.certify_run`).

The radii are parsed once, by the argument type (``--eps 36/255,0.5``: :func:`certify.radius.parse_eps`);
the certification is :func:`certify.certify`'s and its table :func:`certify.radius.certification_table`.
"""

from __future__ import annotations

import argparse
from typing import Any

from lipnet.cli.argtypes import increasing_eps_list, positive_int
from lipnet.training.run import certify_run, summary_table

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``lipnet certify`` for parsed ``args``: write the run's ``certify.json`` and print its table."""
    cert, path = certify_run(
        args.run,
        eps=args.eps,
        n=args.n,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        device=args.device,
        progress=not args.quiet,
    )
    print(summary_table(cert))
    print(f"wrote {path}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``certify`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("certify", help="certify a run's final checkpoint on its test set")
    p.add_argument("run", metavar="RUN", help="run folder written by lipnet train")
    p.add_argument("--eps", type=increasing_eps_list, help="radii, e.g. 36/255,72/255 (default: the run's)")
    p.add_argument("--n", type=positive_int, help="certify the first N test images (default: the run's)")
    p.add_argument("--checkpoint", choices=["final", "last"], default="final")
    p.add_argument("--batch-size", type=positive_int, help="images per batch (default: the run's)")
    p.add_argument("--data-dir", help="dataset folder (default: the run's)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the run's)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p
