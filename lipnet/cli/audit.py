"""``lipnet audit``: audit a third-party model (sound bound, certified radii, attack cross-check).

Wired into :mod:`lipnet.cli.main` with ``add_parser(sub)``; the command runs :func:`run`, which hands
:func:`certify.audit.audit` the model (a lipnet run folder through :func:`load_run_for_audit`) and
the test set; the audit feeds certify's one radius code (:mod:`certify.radius`).

Exit codes: 0 the audit passed; 1 the audit FAILED (an attack changed a certified prediction
inside its radius, or a lower estimate exceeded a bound: a certificate is wrong); 2 bad input
(unknown or unsafe checkpoint, a checkpoint that does not fit its architecture, a truncated file,
wrong input shape, NaN in the data, a model certify cannot bound), reported as one line on stderr,
with nothing written; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from certify.attacks import ATTACKS, resolve_attack
from certify.audit import audit
from certify.contract import UnboundableModuleError
from certify.io import CheckpointError
from certify.loading import LoadedModel, load_model
from certify.radius import SMALL_EPS, format_eps
from certify.rules.folding import Normalize
from lipnet import data
from lipnet.cli.argtypes import (
    autoattack_list,
    check_output_path,
    eps_list,
    float_list,
    json_object,
    non_negative_int,
    one_line,
    positive_int,
)
from lipnet.training.devices import resolve_device
from lipnet.training.run import load_run_model

__all__ = ["add_parser", "load_run_for_audit", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "audit",
        help="audit a model: sound Lipschitz bound, certified radii, attacks inside the radii",
        description=(
            "Bound a model's Lipschitz constant soundly (per layer and along its graph), certify a test "
            "set, and attack every certified sample inside its radius. Exit code 1 when a certificate is "
            "broken, 2 on bad input."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="TorchScript file, torch.export program (.pt2), ONNX file (.onnx, the onnx extra), state_dict "
        "(.pt/.pth, loaded with weights_only) or .safetensors with --arch, or a lipnet run folder",
    )
    p.add_argument(
        "--arch",
        help="package.module:function that builds the architecture of a weights file (imported from the "
        "current folder or PYTHONPATH)",
    )
    p.add_argument(
        "--arch-kwargs", type=json_object, help="JSON keyword arguments of --arch, e.g. '{\"width\": 16}'"
    )
    p.add_argument("--data", required=True, choices=data.list_datasets(), help="test set to audit on")
    p.add_argument("--data-dir", help="dataset folder (default: $LIPNET_DATA, else ./data)")
    p.add_argument(
        "--eps",
        type=eps_list,
        default=list(SMALL_EPS),
        help=f"L2 radii on the [0, 1] pixel scale (default {','.join(format_eps(e) for e in SMALL_EPS)})",
    )
    p.add_argument("--n", type=positive_int, default=1000, help="number of test images (default 1000)")
    p.add_argument(
        "--attack",
        choices=[*ATTACKS, "none"],
        default="auto",
        help="auto (default): AutoAttack on CUDA, L2 PGD on a CPU (AutoAttack takes minutes per radius "
        "there); autoattack, pgd, or none",
    )
    p.add_argument(
        "--attacks",
        type=autoattack_list,
        default=["apgd-ce", "apgd-t"],
        help="AutoAttack attacks to run (default apgd-ce,apgd-t)",
    )
    p.add_argument("--n-attack", type=non_negative_int, default=100, help="images attacked (default 100)")
    p.add_argument("--pgd-steps", type=positive_int, default=50)
    p.add_argument("--mean", type=float_list, help="the model's input normalisation mean, per channel")
    p.add_argument("--std", type=float_list, help="the model's input normalisation std, per channel")
    p.add_argument("--batch-size", type=positive_int, default=250)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", required=True, help="folder for audit.json, audit.md and radii.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _batches(
    images: torch.Tensor, labels: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, images.shape[0], size):
        yield images[start : start + size], labels[start : start + size]


def load_run_for_audit(path: Path, device: str | torch.device) -> LoadedModel:
    """certify's run loader for a lipnet run folder: the model of its ``final`` checkpoint, in eval mode.

    certify never imports lipnet, so ``lipnet audit`` passes this to :func:`certify.loading.load_model`.
    A run that cannot be read raises :class:`certify.io.CheckpointError` (a missing file stays a
    ``FileNotFoundError``); the input shape is the model's ``input_shape`` attribute when it has one.
    """
    try:
        model, cfg = load_run_model(path, "final", device)
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"cannot load the lipnet run {path}: {' '.join(str(err).split())}") from None
    shape = getattr(model, "input_shape", None)
    input_shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list)) else None
    return LoadedModel(model.eval(), f"lipnet run {path} ({cfg.model.name})", "run", input_shape)


def run(args: argparse.Namespace) -> int:
    """Run ``lipnet audit`` for parsed ``args``; returns the exit code (0 passed, 1 failed, 2 bad input)."""
    try:
        # Every argument and the model are checked before the test set is read or generated.
        check_output_path(args.out, "--out", folder=True)
        if (args.mean is None) != (args.std is None):
            raise ValueError("give both --mean and --std (the model's input normalisation), or neither")
        if args.mean is not None:
            Normalize(args.mean, args.std)  # raises ValueError for a zero std or mismatched lengths
        device = resolve_device(args.device)
        loaded = load_model(
            args.model,
            arch=args.arch,
            arch_kwargs=args.arch_kwargs,
            device=device,
            run_loader=load_run_for_audit,
        )
        dataset = data.load(args.data, "test", data_dir=args.data_dir, n=args.n)
        if loaded.input_shape is not None and tuple(loaded.input_shape) != tuple(dataset.input_shape):
            raise ValueError(
                f"the model expects inputs of shape {loaded.input_shape}, but {args.data} images have shape "
                f"{tuple(dataset.input_shape)}"
            )
        report = audit(
            loaded.model,
            _batches(dataset.images, dataset.labels, args.batch_size),
            eps=args.eps,
            attack=args.attack,
            n_attack=args.n_attack,
            mean=args.mean,
            std=args.std,
            out_dir=args.out,
            autoattack_attacks=args.attacks,
            pgd_steps=args.pgd_steps,
            seed=args.seed,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError, UnboundableModuleError, ImportError) as err:
        print(f"lipnet audit: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lipnet audit: interrupted", file=sys.stderr)
        return 130
    print(report.summary())
    if args.attack != "none":
        print(f"attack: {resolve_attack(args.attack, device)}")  # the rule audit() applied
    print(f"wrote {', '.join(str(args.out) + '/' + f for f in report.files)}")
    return 0 if report.passed else 1
