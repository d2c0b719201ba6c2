"""The ``lipnet`` command: ``train``, ``sweep``, ``certify``, ``audit``, ``catalogue``,
``bench layers|fmnist|models``, and ``lipnet --version``.

Exit codes: 0 success, 1 training diverged (or a sweep found a broken certificate), 2 bad input
(unknown key, impossible value, missing dataset, config, model or run folder, corrupted
checkpoint, unknown model, an output path that cannot be written), reported as one line on stderr,
``lipnet <command>: error: ...``, without a traceback; 130 interrupted. Every argument is checked
before any data is generated or any model trained. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from lipnet.argtypes import (
    Parser,
    check_output_path,
    float_list,
    increasing_eps_list,
    name_list,
    non_negative_int,
    one_line,
    positive_float,
    positive_int,
)
from lipnet.audit_cli import add_audit_parser
from lipnet.config import SWEEP_PARAMS, Config, ConfigError, load_config

__all__ = ["build_parser", "main"]


def _config(args: argparse.Namespace) -> Config:
    if args.config is None:
        raise ConfigError("give --config FILE (experiments/configs/*.yaml)")
    cfg = load_config(args.config, args.set)
    if args.device is not None:
        cfg.device = args.device
        cfg.validate()
    return cfg


def _check_buildable(cfg: Config) -> None:
    """Reject a model or loss that cannot be built before any data is loaded (both are cheap to check)."""
    from lipnet.train import build_loss

    cfg.model.check()
    build_loss(cfg)


def _is_main_process() -> bool:
    # torchrun starts one process per device with RANK set; only rank 0 reports.
    return os.environ.get("RANK", "0") == "0"


def _cmd_train(args: argparse.Namespace) -> int:
    from lipnet.config import apply_overrides
    from lipnet.runs import RunFolder
    from lipnet.train import train

    if args.resume is not None:
        if args.out is not None and Path(args.out) != Path(args.resume):
            raise ConfigError("give either --resume RUN or --out DIR, not two different folders")
        if args.config is None:
            cfg = apply_overrides(RunFolder(args.resume).read_config(), args.set)
            if args.device is not None:
                cfg.device = args.device
                cfg.validate()
        else:
            cfg = _config(args)
        cfg.out = str(args.resume)
    else:
        cfg = _config(args)
        if args.out is not None:
            cfg.out = args.out
        elif cfg.out is None:
            cfg.out = str(Path("runs") / Path(args.config).stem)
        check_output_path(cfg.out, "--out", folder=True)
    _check_buildable(cfg)
    result = train(cfg, resume=args.resume is not None, progress=not args.quiet)
    if _is_main_process():
        print(f"run folder: {result.run_dir}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from lipnet.sweep import run_sweep

    cfg = _config(args)
    if args.attack is not None:
        cfg.sweep.attack = args.attack
    if args.attack_n is not None:
        cfg.sweep.attack_n = args.attack_n
    cfg.validate()
    _check_buildable(cfg)
    chosen = [(p, getattr(args, f"{p}s")) for p in SWEEP_PARAMS if getattr(args, f"{p}s") is not None]
    param, values = chosen[0] if chosen else (cfg.sweep.param, cfg.sweep.values)
    out = args.out or cfg.out or str(Path("runs") / f"{Path(args.config).stem}-sweep")
    check_output_path(out, "--out", folder=True)
    result = run_sweep(cfg, param, values, out, progress=not args.quiet)
    print(result.md_path.read_text(encoding="utf-8"))
    print(f"wrote {result.csv_path}, {result.md_path}" + (f", {result.png_path}" if result.png_path else ""))
    return 0 if not result.violations else 1


def _cmd_certify(args: argparse.Namespace) -> int:
    from lipnet.runs import RunFolder, atomic_write_json, certification_table
    from lipnet.train import certify_on_test, load_run_model, load_split

    run = RunFolder(args.run)
    model, cfg = load_run_model(run.path, args.checkpoint, args.device)
    eps = args.eps if args.eps is not None else list(cfg.certify.eps)
    test_ds = load_split(cfg, "test", data_dir=args.data_dir)
    n = args.n if args.n is not None else cfg.certify.n
    cert, _ = certify_on_test(
        model,
        test_ds,
        eps,
        n=n,
        batch_size=args.batch_size if args.batch_size is not None else cfg.certify.batch_size,
        device=next(model.parameters()).device,
        progress=not args.quiet,
    )
    cert = {"checkpoint": args.checkpoint, **cert}
    atomic_write_json(run.certify_path, cert)
    print(certification_table(cert))
    print(f"wrote {run.certify_path}")
    return 0


def _cmd_bench_layers(args: argparse.Namespace) -> int:
    from lipnet import bench

    if args.out is not None:
        check_output_path(args.out, "--out", folder=False)
    return bench.run(args)


def _cmd_bench_fmnist(args: argparse.Namespace) -> int:
    from lipnet import bench_fmnist

    check_output_path(args.out, "--out", folder=True)
    return bench_fmnist.run(args)


def _cmd_bench_models(args: argparse.Namespace) -> int:
    from lipnet import bench_models

    if args.out is not None:
        check_output_path(args.out, "--out", folder=False)
    return bench_models.run(args)


def _cmd_catalogue(args: argparse.Namespace) -> int:
    from lipnet import catalogue

    check_output_path(args.out, "--out", folder=True)
    return catalogue.run(args)


def _version() -> str:
    try:
        return version("lipnet")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lipnet`` (one sub-parser per command)."""
    parser = Parser(
        prog="lipnet", description="Certifiably robust 1-Lipschitz networks: train, sweep, certify."
    )
    parser.add_argument("--version", action="version", version=f"lipnet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(p: argparse.ArgumentParser) -> None:
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

    p_train = sub.add_parser("train", help="train one model into a run folder, then certify it")
    common(p_train)
    p_train.add_argument("--out", help="run folder (default: out in the config, else runs/<config name>)")
    p_train.add_argument(
        "--resume", metavar="RUN", help="continue the run in folder RUN from its last checkpoint"
    )
    p_train.set_defaults(func=_cmd_train)

    p_sweep = sub.add_parser("sweep", help="train one model per loss parameter value; csv, png and md")
    common(p_sweep)
    group = p_sweep.add_mutually_exclusive_group()
    group.add_argument(
        "--taus", type=float_list, help="tau values (tau multiplies the logits), e.g. 0.1,1,10"
    )
    group.add_argument("--margins", type=float_list, help="hinge / HKR margins, e.g. 0.05,0.1,0.2")
    group.add_argument("--alphas", type=float_list, help="HKR alpha values in [0, 1], e.g. 0.9,0.99")
    p_sweep.add_argument("--out", help="sweep folder (default: runs/<config name>-sweep)")
    p_sweep.add_argument("--attack", choices=["auto", "pgd", "autoattack"], help="empirical attack")
    p_sweep.add_argument(
        "--attack-n", type=non_negative_int, help="test images attacked per value (0: no attack)"
    )
    p_sweep.set_defaults(func=_cmd_sweep)

    p_cert = sub.add_parser("certify", help="certify a run's final checkpoint on its test set")
    p_cert.add_argument("run", metavar="RUN", help="run folder written by lipnet train")
    p_cert.add_argument(
        "--eps", type=increasing_eps_list, help="radii, e.g. 36/255,72/255 (default: the run's)"
    )
    p_cert.add_argument("--n", type=positive_int, help="certify the first N test images (default: the run's)")
    p_cert.add_argument("--checkpoint", choices=["final", "last"], default="final")
    p_cert.add_argument("--batch-size", type=positive_int, help="images per batch (default: the run's)")
    p_cert.add_argument("--data-dir", help="dataset folder (default: the run's)")
    p_cert.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the run's)")
    p_cert.add_argument("--quiet", action="store_true")
    p_cert.set_defaults(func=_cmd_certify)

    add_audit_parser(sub)

    p_cat = sub.add_parser("catalogue", help="train and certify every attention method; csv, md and png")
    p_cat.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, two methods per task")
    p_cat.add_argument("--out", default="runs/catalogue", help="output folder (default runs/catalogue)")
    p_cat.add_argument("--methods", type=name_list, help="subset, e.g. baseline,SqueezeExcitation")
    p_cat.add_argument("--tasks", type=name_list, help="subset, e.g. classification,mil")
    p_cat.add_argument("--n-train", type=positive_int, help="training images per task (all tasks)")
    p_cat.add_argument("--n-test", type=positive_int, help="test images per task (all tasks)")
    p_cat.add_argument("--epochs", type=positive_int, help="epochs per method (all tasks)")
    p_cat.add_argument("--lr", type=positive_float, help="Adam learning rate (all tasks)")
    p_cat.add_argument("--tau", type=positive_float, help="tau, which multiplies the logits (all tasks)")
    p_cat.add_argument("--batch-size", type=positive_int, help="batch size (all tasks)")
    p_cat.add_argument("--width", type=positive_int, help="backbone width, even (all tasks)")
    p_cat.add_argument("--attack", choices=["auto", "autoattack", "pgd"], help="attack (default pgd)")
    p_cat.add_argument("--attack-n", type=non_negative_int, help="test samples attacked (default 100)")
    p_cat.add_argument("--attack-steps", type=positive_int, help="PGD steps (default 20)")
    p_cat.add_argument(
        "--restart",
        action="store_true",
        help="train the selected rows again even where the output folder has them (other rows are kept)",
    )
    p_cat.add_argument("--seed", type=non_negative_int, default=0)
    p_cat.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p_cat.add_argument("--quiet", action="store_true", help="no per-method lines")
    p_cat.set_defaults(func=_cmd_catalogue)

    p_bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = p_bench.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    p_layers = bench_sub.add_parser("layers", help="speed and memory of the 1-Lipschitz layers")
    p_layers.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p_layers.add_argument("--batch", type=positive_int, default=64, help="batch size (default 64)")
    p_layers.add_argument(
        "--width", type=positive_int, default=32, help="channels of the first conv (default 32)"
    )
    p_layers.add_argument(
        "--rounds", type=positive_int, default=10, help="interleaved timing rounds (default 10)"
    )
    p_layers.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p_layers.add_argument(
        "--per-layer", action="store_true", help="one layer per kind and its anchor, not the small_cnn nets"
    )
    p_layers.add_argument("--kinds", type=name_list, help="per-layer table of these kinds, e.g. aol,sll")
    p_layers.add_argument("--channels", type=positive_int, default=64, help="per-layer channels (default 64)")
    p_layers.add_argument("--size", type=positive_int, default=32, help="per-layer input size (default 32)")
    p_layers.add_argument(
        "--sv-channels", type=positive_int, default=8, help="channels of the singular-value check (default 8)"
    )
    p_layers.add_argument(
        "--sv-size", type=positive_int, default=8, help="input size of the singular-value check (default 8)"
    )
    p_layers.add_argument("--out", help="output file: the Markdown table if it ends in .md, else JSON rows")
    p_layers.set_defaults(func=_cmd_bench_layers)
    p_fmnist = bench_sub.add_parser(
        "fmnist", help="train and certify lipnet, deel-torchlip and orthogonium nets on Fashion-MNIST"
    )
    p_fmnist.add_argument("--epochs", type=positive_int, default=5, help="epochs per model (default 5)")
    p_fmnist.add_argument(
        "--time-cap", type=positive_float, default=300.0, help="training seconds per model (default 300)"
    )
    p_fmnist.add_argument(
        "--models", type=name_list, help="subset, e.g. lipnet:aol,deel-torchlip:spectral (default: all)"
    )
    p_fmnist.add_argument("--size", choices=["s", "m"], default="s", help="fmnist_convnet_s or _m")
    p_fmnist.add_argument("--n-train", type=positive_int, help="first N training images (default all)")
    p_fmnist.add_argument("--n-test", type=positive_int, help="first N test images (default all 10,000)")
    p_fmnist.add_argument(
        "--attack-n", type=non_negative_int, default=1000, help="test images attacked (default 1000)"
    )
    p_fmnist.add_argument("--attack", choices=["auto", "autoattack", "pgd"], default="auto")
    p_fmnist.add_argument("--attack-steps", type=positive_int, default=50, help="PGD steps (default 50)")
    p_fmnist.add_argument(
        "--tau", type=positive_float, default=5.0, help="τ of τ-CE (τ multiplies the logits)"
    )
    p_fmnist.add_argument("--lr", type=positive_float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p_fmnist.add_argument("--batch-size", type=positive_int, default=128)
    p_fmnist.add_argument("--seed", type=non_negative_int, default=0)
    p_fmnist.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p_fmnist.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p_fmnist.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian's when present)")
    p_fmnist.add_argument("--out", default="runs/fmnist", help="folder of fmnist.csv / fmnist.md")
    p_fmnist.add_argument("--quiet", action="store_true", help="no progress bars")
    p_fmnist.set_defaults(func=_cmd_bench_fmnist)
    p_models = bench_sub.add_parser("models", help="training step of a model family with each layer kind")
    p_models.add_argument("--model", help="model name (default: lipconvnet_m on CUDA, lipconvnet_xs on CPU)")
    p_models.add_argument("--batch", type=positive_int, help="batch size (default: 256 on CUDA, 32 on CPU)")
    p_models.add_argument("--input-size", type=positive_int, default=32, help="image side (default 32)")
    p_models.add_argument("--kinds", type=name_list, help="layer kinds, e.g. aol,cpl (default: all)")
    p_models.add_argument("--no-anchors", action="store_true", help="no deel-torchlip / orthogonium rows")
    p_models.add_argument(
        "--eval-only", action="store_true", help="eval forward vs lipnet.export of every model (or --models)"
    )
    p_models.add_argument("--models", type=name_list, help="with --eval-only: these models (default: all)")
    p_models.add_argument(
        "--rounds", type=positive_int, help="interleaved rounds (default 5; 30 with --eval-only)"
    )
    p_models.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p_models.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p_models.add_argument("--out", help="output file: the Markdown table if it ends in .md, else JSON rows")
    p_models.set_defaults(func=_cmd_bench_models)
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
    from certify.bounds import UnboundableModuleError
    from lipnet.train import TrainingDivergedError

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
    except (ValueError, OSError, UnboundableModuleError) as err:
        # OSError: a path given on the command line that cannot be read or written (FileNotFoundError,
        # PermissionError, a full disk), or a dataset download that failed: input, not a bug.
        print(f"{name}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
