"""``lipnet export``: write a trained model as a torch, ONNX, TorchScript or ``torch.export`` file, verified.

``lipnet export RUN|MODEL --format FORMAT --out FILE`` exports a lipnet run folder's ``final``
checkpoint, or a weights file (``.pt`` / ``.pth`` / ``.safetensors``, with ``--arch``), through
:func:`lipnet.export_formats.export_file`: the file is loaded back with its own runtime, its outputs
on the first ``--n`` test images (the run's dataset, or ``--data``) are compared with the model's,
and certify recomputes the certified radii from the exported graph, before the file is written
atomically.

Exit codes: 0 written; 1 the export was refused because it does not compute the model (its outputs
differ by more than ``--tolerance``), nothing written; 2 bad input (a missing or corrupted run or
weights file, an unknown architecture, a format the model cannot be written in, an ``--out`` that
cannot be written, the ``onnx`` extra missing for ``--format onnx``), one line on stderr, nothing
written; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from certify.contract import UnboundableModuleError
from certify.loading import load_model
from certify.radius import SMALL_EPS, format_eps
from lipnet import data
from lipnet.cli.argtypes import (
    check_output_path,
    eps_list,
    json_object,
    one_line,
    positive_float,
    positive_int,
)
from lipnet.cli.audit import load_run_for_audit
from lipnet.export_formats import FORMATS, TOLERANCE, ExportError, ExportMismatchError, export_file
from lipnet.training.devices import resolve_device
from lipnet.training.run import load_run_model

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "export",
        help="write a model as a torch, ONNX, TorchScript or torch.export file, verified first",
        description=(
            "Export a run's final model (or a weights file with --arch) in plain portable operations. The "
            "file is loaded back with its own runtime, compared with the model on real test images (refused "
            "above --tolerance) and certified again from its own graph before it is written. Exit code 1 "
            "when the export is refused, 2 on bad input."
        ),
    )
    p.add_argument("source", metavar="RUN|MODEL", help="a lipnet run folder, or a weights file with --arch")
    p.add_argument("--format", required=True, choices=FORMATS, help="file format")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--arch", help="package.module:function that builds the model of a weights file")
    p.add_argument("--arch-kwargs", type=json_object, help="JSON keyword arguments of --arch")
    p.add_argument(
        "--data",
        choices=data.list_datasets(),
        help="test images for the verification (default: the run's dataset)",
    )
    p.add_argument("--data-dir", help="dataset folder (default: the run's, else $LIPNET_DATA or ./data)")
    p.add_argument("--n", type=positive_int, default=64, help="test images of the verification (default 64)")
    p.add_argument(
        "--eps",
        type=eps_list,
        default=list(SMALL_EPS),
        help=f"radii of the certification check (default {','.join(format_eps(e) for e in SMALL_EPS)})",
    )
    p.add_argument(
        "--tolerance",
        type=positive_float,
        default=TOLERANCE,
        help=f"largest accepted |exported - model| on the verification images (default {TOLERANCE:g})",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``lipnet export`` for parsed ``args``; the exit code (0 written, 1 refused, 2 bad input)."""
    try:
        check_output_path(args.out, "--out", folder=False)
        device = resolve_device(args.device)
        source = Path(args.source)
        data_name, data_dir = args.data, args.data_dir
        if source.is_dir():
            if args.arch is not None:
                raise ValueError("--arch is for weights files; a run folder already names its model")
            load_run_for_audit(source, device)  # one-line CheckpointError for a folder that is not a run
            model, cfg = load_run_model(source, "final", device)
            data_name = data_name or cfg.data.name
            data_dir = data_dir if data_dir is not None else cfg.data.data_dir
        else:
            loaded = load_model(source, arch=args.arch, arch_kwargs=args.arch_kwargs, device=device)
            if loaded.kind not in ("state_dict", "safetensors"):
                raise ValueError(
                    f"{source} is a {loaded.kind} file, already exported: give a run folder or a weights "
                    "file with --arch"
                )
            model = loaded.model
            if data_name is None:
                raise ValueError("give --data: the test images a weights file is verified on")
        dataset = data.load(data_name, "test", data_dir=data_dir, n=args.n)
        report = export_file(
            model,
            args.out,
            args.format,
            dataset.images[: args.n],
            dataset.labels[: args.n],
            eps=args.eps,
            tolerance=args.tolerance,
            input_shape=tuple(dataset.input_shape),
        )
    except ExportMismatchError as err:
        print(f"lipnet export: error: {one_line(err)}", file=sys.stderr)
        return 1
    except (ValueError, ExportError, FileNotFoundError, UnboundableModuleError, ImportError) as err:
        print(f"lipnet export: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lipnet export: interrupted", file=sys.stderr)
        return 130
    print(report.summary())
    return 0
