"""``lipnet bench layers|fmnist|models|kernels|recipe``: the benchmarks of :mod:`lipnet.bench`, their files.

``layers``: the small_cnn networks of each library (:func:`lipnet.bench.layers.bench_layers`), or with
``--per-layer`` / ``--kinds`` one layer per kind next to its anchor
(:func:`lipnet.bench.layers.bench_per_layer`). ``fmnist``: every layer kind and anchor trained,
certified and attacked on Fashion-MNIST (:func:`lipnet.bench.fmnist.bench_fmnist`; ``fmnist.csv`` and
``fmnist.md``, rewritten after each network). ``models``: a model family with each kind and anchor
(:func:`lipnet.bench.models.bench_models`), or ``--eval-only`` every model against its export
(:func:`lipnet.bench.models.bench_eval`). ``--modes`` of ``layers`` and ``models`` times each network
eagerly, compiled and compiled with CUDA-graph capture (:mod:`lipnet.bench.modes`). ``kernels``: the ATen
operations one training step dispatches, per kind and library (:func:`lipnet.bench.kernels.bench_kernels`).
``--out F`` of ``layers``, ``models`` and ``kernels`` writes the Markdown table when ``F`` ends in ``.md``,
else the rows as JSON. ``recipe``: a training recipe's elements toggled on one budget (its own module,
:mod:`lipnet.cli.recipe`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from certify.attacks import ATTACKS, resolve_attack
from certify.io import atomic_write_text
from lipnet.bench import device_label
from lipnet.bench.anchors import ANCHORS
from lipnet.bench.fmnist import bench_fmnist, to_csv, to_markdown
from lipnet.bench.kernels import NETWORKS, bench_kernels, kernels_markdown
from lipnet.bench.layers import (
    bench_layers,
    bench_per_layer,
    layer_networks,
    layers_markdown,
    per_layer_markdown,
)
from lipnet.bench.models import (
    EPOCH_IMAGES,
    PUBLISHED_A100_S_PER_EPOCH,
    bench_certify,
    bench_eval,
    bench_models,
    certify_markdown,
    eval_markdown,
    implementations,
    models_markdown,
)
from lipnet.bench.modes import BACKENDS, MODES, check_modes
from lipnet.cli.argtypes import (
    Parser,
    check_output_path,
    name_list,
    non_negative_int,
    positive_float,
    positive_int,
)
from lipnet.cli.recipe import add_parser as add_recipe_parser
from lipnet.layers.kinds import list_layer_kinds
from lipnet.training.devices import resolve_device

__all__ = ["add_parser", "run_fmnist", "run_kernels", "run_layers", "run_models"]


def _emit(out: str | None, text: str, body: dict[str, Any]) -> None:
    """Print the table ``text``; with ``out``, write it there (``.md``) or ``body`` as JSON (else)."""
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n" if path.suffix == ".md" else json.dumps(body, indent=2))


def _per_layer_header(args: argparse.Namespace, device: str) -> str:
    c, s = args.channels, args.size
    memory = (
        "tensors saved for backward (torch.autograd.graph.saved_tensors_hooks, excluding input and "
        "parameters)"
    )
    if torch.device(device).type == "cuda":
        memory += "; CUDA peak: torch.cuda.max_memory_allocated during a training step above the baseline"
    return (
        f"One channel-preserving 3x3 layer per kind, input {args.batch}x{c}x{s}x{s}, {device_label(device)}, "
        f"torch {torch.__version__}; medians over {args.rounds} interleaved rounds. Train step: forward + "
        f"backward + Adam. Memory: {memory}. σ range: float64 singular values of each freshly initialised "
        f"layer at {args.sv_channels} channels, {args.sv_size}x{args.sv_size} (exact matrix for linear "
        "layers; Jacobian at a random point for residual blocks: a local view only). Ratios: to the anchor "
        "of the same kind."
    )


def run_layers(args: argparse.Namespace) -> int:
    """Run ``lipnet bench layers``: the network table, or with ``--per-layer`` / ``--kinds`` the per-layer
    table."""
    if args.out is not None:
        check_output_path(args.out, "--out", folder=False)
    modes = check_modes(args.modes, args.compile_backend)
    device = str(resolve_device(args.device or "auto"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.per_layer or args.kinds:
        rows = bench_per_layer(
            kinds=args.kinds,
            channels=args.channels,
            size=args.size,
            batch=args.batch,
            rounds=args.rounds,
            device=device,
            sv_channels=args.sv_channels,
            sv_size=args.sv_size,
        )
        text = per_layer_markdown(rows, _per_layer_header(args, device))
    else:
        rows = bench_layers(
            width=args.width,
            batch=args.batch,
            rounds=args.rounds,
            device=device,
            modes=modes,
            backend=args.compile_backend,
            networks=args.networks,
        )
        text = layers_markdown(
            rows,
            f"small_cnn width {args.width}, batch {args.batch}x3x32x32, {device_label(device)}, torch "
            f"{torch.__version__}; medians over {args.rounds} interleaved rounds of every network in every "
            f"mode ({_modes_text(modes, args.compile_backend)}). Train step: forward + cross-entropy + "
            "backward + Adam. lipnet's Björck weights are computed in batched calls "
            "(lipnet.layers.batching); [per layer]: without. Ratios to deel-torchlip and to the plain "
            "network in the same mode.",
        )
    _emit(args.out, text, {"device": device_label(device), "rows": rows})
    return 0


def _modes_text(modes: list[str], backend: str) -> str:
    words = {
        "eager": "eager",
        "compile": f"torch.compile, {backend}",
        "graph": f"torch.compile mode=reduce-overhead, {backend}: CUDA graphs on CUDA",
    }
    return "; ".join(f"{m}: {words[m]}" for m in modes)


def run_kernels(args: argparse.Namespace) -> int:
    """Run ``lipnet bench kernels``: the operations of one training step per network and implementation."""
    if args.out is not None:
        check_output_path(args.out, "--out", folder=False)
    rows, skipped = bench_kernels(
        networks=args.networks, kinds=args.kinds, width=args.width, batch=args.batch
    )
    header = (
        f"ATen operations dispatched by one training step (zero_grad, forward, cross-entropy, backward, "
        f"Adam foreach step), counted on the CPU by a TorchDispatchMode after two warm-up steps; torch "
        f"{torch.__version__}. kernels: the operations that are not views (an upper proxy of the kernels a "
        f"GPU launches). small_cnn at width {args.width}, bethune_vgg at its default widths; every row the "
        "same layout, activation and pooling, only the layers differ; anchors configured as lipnet's kind. "
        "lipnet rows batch their Björck weights as on CUDA; [cpu batching]: as on a CPU; [per layer]: not "
        "batched. Ratios: to the anchor of the same kind (deel-torchlip for Björck) and to the plain network."
    )
    if skipped:
        header += f" Not counted: {'; '.join(skipped)}."
    _emit(args.out, kernels_markdown(rows, header), {"rows": rows, "skipped": skipped})
    return 0


def run_fmnist(args: argparse.Namespace) -> int:
    """Run ``lipnet bench fmnist``; ``fmnist.csv`` and ``fmnist.md`` are rewritten after each network."""
    check_output_path(args.out, "--out", folder=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    choice = resolve_attack(args.attack, resolve_device(args.device))
    attack = choice.name
    where = (
        torch.cuda.get_device_name(0)
        if args.device != "cpu" and torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    cap = f"{args.time_cap:g} s" if args.time_cap is not None else "none"
    attack_text = (
        "AutoAttack (APGD-CE + APGD-T) through pyautoattack"
        if attack == "autoattack"
        else f"L2 PGD ({args.attack_steps} steps)"
    ) + (f" [{choice.reason}]" if args.attack == "auto" else "")
    header = (
        f"# Fashion-MNIST, fmnist_convnet_{args.size}: {args.epochs} epoch(s), time cap {cap} per model, "
        f"τ-CE τ={args.tau:g}, Adam lr {args.lr:g} cosine, batch {args.batch_size}, seed {args.seed}; "
        f"{args.n_train or 60000} training / {args.n_test or 10000} test images; "
        f"empirical: {attack_text} on the first {args.attack_n} test images (certified samples count as "
        f"robust without attack); {where}, torch {torch.__version__}\n\n"
        "Accuracies in %. Certificates from certify.bounds.lipschitz_bound (float64, from the weights)."
    )

    def write(rows: list[dict[str, Any]]) -> None:
        # Created with the first row, so that bad arguments (rejected before it) leave no folder.
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "fmnist.csv", to_csv(rows))
        atomic_write_text(out / "fmnist.md", to_markdown(rows, header))

    rows = bench_fmnist(
        size=args.size,
        models=args.models,
        epochs=args.epochs,
        time_cap=args.time_cap,
        n_train=args.n_train,
        n_test=args.n_test,
        attack_n=args.attack_n,
        attack=attack,
        attack_steps=args.attack_steps,
        tau=args.tau,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        data_dir=args.data_dir,
        progress=not args.quiet,
        on_row=write,
    )
    print(to_markdown(rows, header))
    print(f"wrote {out / 'fmnist.csv'}, {out / 'fmnist.md'}")
    return 0


def _run_eval(args: argparse.Namespace, device: str) -> int:
    batch = args.batch or 32
    rounds = args.rounds or 30
    rows, skipped = bench_eval(
        models=args.models, kinds=args.kinds, batch=batch, rounds=rounds, device=device
    )
    header = (
        f"Eval forward vs lipnet.export (plain frozen weights), batch {batch}, {device_label(device)}, "
        f"torch {torch.__version__}; every model at a small size (lipnet.bench.models.EVAL_KWARGS), 3 "
        f"warm-up forwards, {rounds} rounds alternating which goes first, no_grad, eval mode. Target: "
        "eval / exported <= 1.1. plain share: fraction of the exported parameters in plain nn.Conv2d / "
        "nn.ConvTranspose2d / nn.Linear (the export freezes every layer; Cayley becomes an FFT with a frozen "
        "symbol, SLL and CPL blocks residual steps of plain convolutions)."
    )
    if skipped:
        header += f" Not built (the constructor refuses the kind): {', '.join(skipped)}."
    body = {"device": device_label(device), "batch": batch, "rows": rows, "skipped": skipped}
    _emit(args.out, eval_markdown(rows, header), body)
    return 0


def _run_certify(args: argparse.Namespace, device: str) -> int:
    model = args.model or "lipconvnet_m"
    batch = args.batch or 256
    rounds = args.rounds or 3
    kinds = args.kinds or ["cpl"]
    rows = bench_certify(
        model=model, kinds=kinds, n=args.certify, batch=batch, input_size=args.input_size, rounds=rounds,
        device=device,
    )  # fmt: skip
    header = (
        f"Certification of {args.certify:,} synthetic {args.input_size}x{args.input_size} images against one "
        f"eval pass over them, {model}, batch {batch}, {device_label(device)}, torch {torch.__version__}; "
        f"medians over {rounds} rounds in alternating order. Certify: certify.certify (float64 bound from "
        "the weights, float32 forward with autocast off, radii), as lipnet train and lipnet certify run it. "
        "Target: certify / eval <= 1.1."
    )
    body = {"device": device_label(device), "model": model, "rows": rows}
    _emit(args.out, certify_markdown(rows, header), body)
    return 0


def run_models(args: argparse.Namespace) -> int:
    """Run ``lipnet bench models``, or ``--eval-only`` the eval table, or ``--certify N`` the certify time.

    Without ``--model`` / ``--batch``: ``lipconvnet_m`` at batch 256 on CUDA, ``lipconvnet_xs`` at batch
    32 on CPU (the header says which).
    """
    if args.out is not None:
        check_output_path(args.out, "--out", folder=False)
    modes = check_modes(args.modes, args.compile_backend)
    device = str(resolve_device(args.device or "auto"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_only:
        return _run_eval(args, device)
    if args.certify:
        return _run_certify(args, device)
    on_cuda = torch.device(device).type == "cuda"
    model = args.model or ("lipconvnet_m" if on_cuda else "lipconvnet_xs")
    batch = args.batch or (256 if on_cuda else 32)
    rounds = args.rounds or 5
    size = args.input_size
    anchors = not args.no_anchors
    rows = bench_models(
        model=model,
        kinds=args.kinds,
        anchors=anchors,
        batch=batch,
        input_size=size,
        rounds=rounds,
        device=device,
        modes=modes,
        backend=args.compile_backend,
    )
    defaults = "" if on_cuda or args.model else " (the CPU default; lipconvnet_m at batch 256 on CUDA)"
    published = ", ".join(f"{k} {v:g} s" for k, v in PUBLISHED_A100_S_PER_EPOCH.items())
    header = (
        f"{model}{defaults}, batch {batch}x3x{size}x{size}, {device_label(device)}, "
        f"torch {torch.__version__}; medians over {rounds} interleaved rounds of every row in every mode "
        f"({_modes_text(modes, args.compile_backend)}). Train step: forward + cross-entropy + backward + "
        "Adam; "
        f"s per epoch = {EPOCH_IMAGES:,} images at that rate. Published (Prach et al., CVPR 2024, "
        f"LipConvNet-M on one A100, s per 50k-image epoch): {published}. Eval: no_grad, eval mode, warm "
        "caches, against lipnet.export(model) (plain frozen weights; n/a where the export fails or differs); "
        "target eval / exported <= 1.1; plain share: fraction of the exported parameters in plain "
        "nn.Conv2d / nn.ConvTranspose2d / nn.Linear."
    )
    if anchors:
        pairs = ", ".join(f"lipnet:{k} vs {a.label}" for k, a in ANCHORS.items())
        header += (
            " Anchors (the same architecture from the anchor library's layers; ratios lipnet / anchor): "
            f"{pairs}."
        )
        _, missing = implementations(args.kinds or list_layer_kinds(), anchors)
        if missing:
            header += f" Not installed, skipped: {', '.join(missing)}."
    body = {"device": device_label(device), "model": model, "batch": batch, "rows": rows}
    _emit(args.out, models_markdown(rows, header), body)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` and its commands ``layers``, ``fmnist`` and ``models`` to ``subparsers``."""
    p_bench = subparsers.add_parser("bench", help="benchmarks")
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
    p_layers.add_argument(
        "--networks",
        type=name_list,
        help=f"some of the networks (default all: {','.join(layer_networks())})",
    )
    p_layers.add_argument("--channels", type=positive_int, default=64, help="per-layer channels (default 64)")
    p_layers.add_argument("--size", type=positive_int, default=32, help="per-layer input size (default 32)")
    p_layers.add_argument(
        "--sv-channels", type=positive_int, default=8, help="channels of the singular-value check (default 8)"
    )
    p_layers.add_argument(
        "--sv-size", type=positive_int, default=8, help="input size of the singular-value check (default 8)"
    )
    _add_modes(p_layers)
    p_layers.add_argument("--out", help="output file: the Markdown table if it ends in .md, else JSON rows")
    p_layers.set_defaults(func=run_layers)

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
    p_fmnist.add_argument(
        "--attack",
        choices=list(ATTACKS),
        default="auto",
        help="auto (default): AutoAttack on CUDA, PGD on a CPU",
    )
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
    p_fmnist.set_defaults(func=run_fmnist)

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
        "--certify",
        type=positive_int,
        help="time the certification of N images against one eval pass (kinds: --kinds, default cpl)",
    )
    p_models.add_argument(
        "--rounds", type=positive_int, help="interleaved rounds (default 5; 30 with --eval-only)"
    )
    p_models.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p_models.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    _add_modes(p_models)
    p_models.add_argument("--out", help="output file: the Markdown table if it ends in .md, else JSON rows")
    p_models.set_defaults(func=run_models)

    p_kernels = bench_sub.add_parser(
        "kernels", help="ATen operations per training step of each layer kind and library (deterministic)"
    )
    p_kernels.add_argument("--networks", type=name_list, help=f"networks (default: {','.join(NETWORKS)})")
    p_kernels.add_argument("--kinds", type=name_list, help="lipnet layer kinds (default: all)")
    p_kernels.add_argument(
        "--width", type=positive_int, default=32, help="small_cnn's first width, even (default 32)"
    )
    p_kernels.add_argument(
        "--batch", type=positive_int, default=2, help="batch size (the counts do not depend on it)"
    )
    p_kernels.add_argument("--out", help="output file: the Markdown table if it ends in .md, else JSON rows")
    p_kernels.set_defaults(func=run_kernels)

    add_recipe_parser(bench_sub)  # lipnet.cli.recipe: the recipe ablation (lipnet.bench.recipe)
    return p_bench


def _add_modes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modes",
        type=name_list,
        default=["eager"],
        help=f"comma-separated, of {','.join(MODES)} (default eager; graph: CUDA graphs on CUDA)",
    )
    parser.add_argument(
        "--compile-backend",
        choices=BACKENDS,
        default="inductor",
        help="torch.compile backend (default inductor)",
    )
