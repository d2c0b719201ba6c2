"""The ``lipnet`` command: ``train``, ``sweep``, ``certify``, ``audit``, ``export``, ``catalogue``,
``bench layers|fmnist|models``, and ``lipnet --version``.

Each command is one module of this package that owns its parser (``add_parser(subparsers)``) and
its run (the function its parser sets as ``func``): :mod:`~lipnet.cli.train`,
:mod:`~lipnet.cli.sweep`, :mod:`~lipnet.cli.certify`, :mod:`~lipnet.cli.audit`,
:mod:`~lipnet.cli.export`, :mod:`~lipnet.cli.catalogue`, :mod:`~lipnet.cli.bench`. This module
builds the parser from them and maps errors to exit codes.

Exit codes: 0 success, 1 training diverged (:class:`~lipnet.training.loop.TrainingDivergedError`) or
a broken certificate (a sweep's or an audit's), 2 bad input (unknown key, impossible value, missing
dataset, config, model or run folder, corrupted checkpoint, unknown model, an output path that
cannot be written), reported as one line on stderr, ``lipnet <command>: error: ...``, without a
traceback; 130 interrupted. Every argument is checked before any data is generated or any model
trained. Anything else is a bug and keeps its traceback.

Imports. Every command module imports what it runs at its top, none inside a function: ``import
lipnet`` already loads torch, which is nearly all of the start-up time (``lipnet --help``: about 4 s on
a loaded 2-core machine, of which the command modules beyond torch and lipnet take about 0.5 s), so
importing a command's code lazily would save little. Only the optional dependencies (deel-torchlip,
orthogonium, matplotlib, autoattack) are imported where they are used.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from certify.contract import UnboundableModuleError
from lipnet.cli import audit, bench, catalogue, certify, export, sweep, train
from lipnet.cli.argtypes import Parser, one_line
from lipnet.training.loop import TrainingDivergedError

__all__ = ["build_parser", "main"]


def _version() -> str:
    try:
        return version("lipnet")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lipnet`` (one sub-parser per command, each from its module)."""
    parser = Parser(
        prog="lipnet", description="Certifiably robust 1-Lipschitz networks: train, sweep, certify."
    )
    parser.add_argument("--version", action="version", version=f"lipnet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (train, sweep, certify, audit, export, catalogue, bench):
        command.add_parser(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The sub-parser of the command that ``args`` were parsed for (``lipnet bench layers``'s, ...)."""
    for dest in ("command", "bench_command"):
        sub = next(
            (a for a in parser._actions if isinstance(a, argparse._SubParsersAction) and a.dest == dest), None
        )
        if sub is None or getattr(args, dest, None) is None:
            break
        parser = sub.choices[getattr(args, dest)]
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lipnet`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # argparse would report these from the top-level parser ("lipnet: error:"); the command's
            # own parser names the command, as every other error of the command does.
            _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    name = " ".join(["lipnet", args.command, *([args.bench_command] if args.command == "bench" else [])])
    try:
        return int(args.func(args))
    except TrainingDivergedError as err:
        print(f"{name}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except (ValueError, OSError, UnboundableModuleError, ImportError) as err:
        # OSError: a path given on the command line that cannot be read or written (FileNotFoundError,
        # PermissionError, a full disk), or a dataset download that failed: input, not a bug.
        # ImportError: an optional extra the command was asked to use is not installed.
        print(f"{name}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
