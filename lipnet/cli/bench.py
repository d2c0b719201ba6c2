"""``lipnet bench layers|fmnist|seeds|models|kernels|recipe``: the benchmarks of :mod:`lipnet.bench`.

``layers``: the small_cnn networks of each library (:func:`lipnet.bench.layers.bench_layers`), or with
``--per-layer`` / ``--kinds`` one layer per kind next to its anchor
(:func:`lipnet.bench.layers.bench_per_layer`). ``fmnist``: every layer kind and anchor trained,
certified and attacked on Fashion-MNIST (:func:`lipnet.bench.fmnist.bench_fmnist`; ``fmnist.csv`` and
``fmnist.md``, rewritten after each network); ``seeds``: the mean and spread over seeds of ``fmnist`` folders
(:func:`lipnet.bench.seeds.seed_means`) and lipnet's paired differences against the anchors
(:func:`lipnet.bench.seeds.paired_differences`). ``models``: a model family with each kind and anchor
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
import os
import time
from pathlib import Path
from typing import Any

import torch

from certify.attacks import ATTACKS, resolve_attack
from certify.io import atomic_write_json, atomic_write_text
from lipnet.bench import device_label
from lipnet.bench.anchors import ANCHORS
from lipnet.bench.fmnist import (
    TIME_STEPS,
    bench_fmnist,
    default_recipe,
    layout_of,
    timing_markdown,
    to_csv,
    to_markdown,
)
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
from lipnet.bench.seeds import differences_markdown, paired_differences, seed_means, seeds_markdown
from lipnet.cli.argtypes import (
    Parser,
    check_output_path,
    name_list,
    non_negative_int,
    positive_float,
    positive_float_list,
    positive_int,
    seed_list,
)
from lipnet.cli.recipe import add_parser as add_recipe_parser
from lipnet.cli.train import epoch_log
from lipnet.layers.kinds import list_layer_kinds
from lipnet.training.config import Config, ConfigError, apply_overrides, load_config
from lipnet.training.devices import resolve_device
from lipnet.training.run import describe_recipe

__all__ = ["add_parser", "run_fmnist", "run_kernels", "run_layers", "run_models", "run_seeds"]


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


def _fmnist_recipe(args: argparse.Namespace) -> Config:
    """The recipe of ``lipnet bench fmnist``: ``--config`` with ``--set`` (else :func:`default_recipe` of
    ``--size``), then the options that override it (``--tau``, ``--lr``, ``--batch-size``, ``--epochs``,
    ``--seed``, ``--n-train``, ``--n-test``, ``--device``)."""
    if args.config is None:
        if args.set:
            raise ConfigError("--set changes a --config: give --config FILE")
        recipe = default_recipe(args.size or "s")
    else:
        if args.size is not None:
            raise ConfigError("--size: with --config, the config's model.name sets the size")
        recipe = load_config(args.config, args.set)
    if args.tau is not None and args.taus is not None:
        raise ConfigError("give --tau (one τ) or --taus (a list), not both")
    overrides = [
        f"{key}={value!r}"
        for key, value in (
            ("loss.tau", args.tau),
            ("optim.lr", args.lr),
            ("optim.batch_size", args.batch_size),
            ("optim.epochs", args.epochs),
            ("seed", args.seed),
            ("data.n_train", args.n_train),
            ("data.n_test", args.n_test),
        )
        if value is not None
    ]
    recipe = apply_overrides(recipe, overrides)
    if args.device is not None:
        recipe.device = args.device
        recipe.validate()
    return recipe


def _fmnist_header(args: argparse.Namespace, recipe: Config, time_cap: float | None, attack: str) -> str:
    size, layout, options = layout_of(recipe)
    choice = resolve_attack(args.attack, resolve_device(recipe.device))
    where = (
        torch.cuda.get_device_name(0)
        if resolve_device(recipe.device).type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    cap = f"{time_cap:g} s per model" if time_cap is not None else "none"
    attack_text = (
        (
            "AutoAttack (APGD-CE + APGD-T) through pyautoattack"
            if attack == "autoattack"
            else f"L2 PGD ({args.attack_steps} steps)"
        )
        + (f" [{choice.reason}]" if args.attack == "auto" else "")
        + f" on the first {args.attack_n} test images (certified samples count as robust without attack)"
        if args.attack_n
        else "none"
    )
    loss = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in recipe.loss.kwargs.items()
        if k != "tau" or args.taus is None
    )
    taus = f"τ per row ({', '.join(f'{t:g}' for t in args.taus)})" if args.taus is not None else ""
    lipnet_only = ", ".join(f"{k}={v}" for k, v in options.items()) or "none"
    n_train = recipe.data.n_train or 60000
    n_test = recipe.data.n_test or 10000
    return (
        f"# Fashion-MNIST, one layout for every library: fmnist_layers(width={layout['width']}, "
        f"blocks={layout['blocks']}, hidden={layout['hidden']}) (fmnist_convnet_{size}); "
        f"{recipe.optim.epochs} epoch(s) on {n_train} training images, certified on {n_test} test images "
        f"by certify.certify; time cap {cap}; seed {recipe.seed}; {where}, torch {torch.__version__}; "
        f"started {time.strftime('%Y-%m-%d %H:%M')} at load average {_load()}\n\n"
        "Every row, anchors included, is trained by the same loop (lipnet.training.loop.fit), optimiser "
        f"and recipe, from the same seed and data order: loss {recipe.loss.name}{f'({loss})' if loss else ''}"
        f"{'; ' + taus if taus else ''} (τ multiplies the logits); "
        f"{describe_recipe(recipe)}; every bias zero at initialisation (lipnet's and deel-torchlip's layers "
        "are built so, orthogonium's draw it uniformly and are zeroed). "
        f"lipnet-only options of lipnet's rows: {lipnet_only}; lipnet's Björck "
        "weights computed in batched calls, as lipnet train computes them. Anchors: their own layers, "
        "activation and pooling (deel-torchlip GroupSort2 + ScaledL2NormPool2d; orthogonium MaxMin + "
        f"lipnet's ScaledL2NormPool2d) and dense head. Empirical robustness: {attack_text}.\n\n"
        "Accuracies in % (train: the last epoch's running accuracy); mean radius: mean certified L2 radius "
        "(0 when misclassified); certificates from certify.bounds.lipschitz_bound (float64, from the "
        "weights); s/epoch: wall-clock of the training steps, comparable only between rows trained under "
        "the same load (see the interleaved step times)."
    )


def run_fmnist(args: argparse.Namespace) -> int:
    """Run ``lipnet bench fmnist``; ``fmnist.csv`` and ``fmnist.md`` are rewritten after each network,
    each finished row is kept in ``rows/`` (resumed from), the step times in ``timing.json``. With
    ``--seeds``, one such run per seed in ``--out``/``seed<N>`` (the step times with the first only), then
    their means and standard deviations (:func:`lipnet.bench.seeds.seed_means`) in ``fmnist_seeds.md``."""
    if args.seeds is None:
        return _run_fmnist_once(args)
    if args.seed is not None:
        raise ConfigError("give --seed (one run) or --seeds (one run per seed), not both")
    if len(args.seeds) < 2:
        raise ConfigError(
            f"--seeds takes at least two seeds (a mean over one run is that run), got {args.seeds}"
        )
    check_output_path(args.out, "--out", folder=True)
    folders = []
    for k, seed in enumerate(args.seeds):
        folder = str(Path(args.out) / f"seed{seed}")
        time_rounds = args.time_rounds if k == 0 else 0
        one = argparse.Namespace(
            **{**vars(args), "seed": seed, "seeds": None, "out": folder, "time_rounds": time_rounds}
        )
        _run_fmnist_once(one)
        folders.append(folder)
    _report_seed_means(folders, Path(args.out) / "fmnist_seeds.md")
    return 0


def _run_fmnist_once(args: argparse.Namespace) -> int:
    recipe = _fmnist_recipe(args)
    layout_of(recipe)  # a recipe of another model or data set is refused before any work
    check_output_path(args.out, "--out", folder=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    attack = resolve_attack(args.attack, resolve_device(recipe.device)).name
    time_cap = args.time_cap if args.time_cap is not None else (300.0 if args.config is None else None)
    header = _fmnist_header(args, recipe, time_cap, attack)
    timing_path = out / "timing.json"

    def write(rows: list[dict[str, Any]]) -> None:
        # Created with the first row, so that bad arguments (rejected before it) leave no folder.
        out.mkdir(parents=True, exist_ok=True)
        text = to_markdown(rows, header)
        if timing_path.is_file():
            saved = json.loads(timing_path.read_text(encoding="utf-8"))
            text += "\n" + timing_markdown(saved["rows"], saved["header"])
        atomic_write_text(out / "fmnist.csv", to_csv(rows))
        atomic_write_text(out / "fmnist.md", text)

    def write_timing(timing: list[dict[str, Any]]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        timing_header = (
            f"Training step of each network, timed in one process: {args.time_rounds} interleaved rounds "
            f"(rotating order) of {TIME_STEPS} steps each, batch {recipe.optim.batch_size}, the recipe's "
            "optimiser, callbacks and learning-rate schedule (the run's first steps), after one warm-up "
            f"round; CPU threads {torch.get_num_threads()}"
            if resolve_device(recipe.device).type == "cpu"
            else f"Training step of each network, timed in one process: {args.time_rounds} interleaved "
            f"rounds of {TIME_STEPS} steps, batch {recipe.optim.batch_size}, {torch.cuda.get_device_name(0)}"
        )
        timing_header += f"; {time.strftime('%Y-%m-%d %H:%M')}, load average {_load()}."
        atomic_write_json(timing_path, {"header": timing_header, "rows": timing})
        print(timing_markdown(timing, timing_header))

    rows = bench_fmnist(
        recipe,
        taus=args.taus,
        models=args.models,
        time_cap=time_cap,
        attack_n=args.attack_n,
        attack=attack,
        attack_steps=args.attack_steps,
        data_dir=args.data_dir,
        progress=not args.quiet,
        out=out,
        time_rounds=args.time_rounds,
        on_row=write,
        on_timing=write_timing,
        log=epoch_log,
    )
    print(to_markdown(rows, header))
    print(f"wrote {out / 'fmnist.csv'}, {out / 'fmnist.md'}")
    return 0


def run_seeds(args: argparse.Namespace) -> int:
    """Run ``lipnet bench seeds``: the tables of :func:`lipnet.bench.seeds.seed_means` and
    :func:`lipnet.bench.seeds.paired_differences` on stdout and ``--out``."""
    if args.out is not None:
        check_output_path(args.out, "--out", folder=False)
    _report_seed_means(args.folders, args.out, args.models)
    return 0


def _report_seed_means(folders: list[str], path: str | Path | None, models: list[str] | None = None) -> None:
    """Print the tables of :func:`lipnet.bench.seeds.seed_means` and
    :func:`lipnet.bench.seeds.paired_differences` (when a lipnet network and an anchor share two seeds)
    over ``folders``, of ``models`` only where given, and write them to ``path``."""
    runs = f"{len(folders)} lipnet bench fmnist runs: " + ", ".join(folders)
    means = seed_means(folders, models)
    text = seeds_markdown(means, f"Mean over seeds (sample standard deviation) of {runs}")
    if pairs := paired_differences(folders, models):
        header = (
            "lipnet minus each anchor at the same τ, mean over the seeds both have of the per-seed "
            "difference (percentage points; its standard error, sd / sqrt(n), in brackets)"
        )
        text += "\n" + differences_markdown(pairs, header)
    print(text, end="")
    if path is not None:
        atomic_write_text(path, text)
        print(f"wrote {path}")


def _load() -> str:
    """The 1-minute load average of the machine (``n/a`` where the platform has none)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "n/a"


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
        "fmnist",
        help="train and certify lipnet, deel-torchlip and orthogonium nets on Fashion-MNIST under one recipe",
    )
    p_fmnist.add_argument(
        "--config",
        help="run config every library trains under (model layout, loss, optimiser, schedule, batch, "
        "epochs, data budget; e.g. experiments/configs/fmnist_convnet_s.yaml); default: fmnist_convnet_s "
        "with Adam 2e-3 cosine",
    )
    p_fmnist.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a --config value"
    )
    p_fmnist.add_argument(
        "--epochs", type=positive_int, help="epochs per model (default: the config's, else 5)"
    )
    p_fmnist.add_argument(
        "--time-cap",
        type=positive_float,
        help="training seconds per model (default: none with --config, else 300)",
    )
    p_fmnist.add_argument(
        "--models",
        type=name_list,
        help=(
            "subset, e.g. lipnet:auto,deel-torchlip:spectral,orthogonium:aoc (default: all); lipnet:auto "
            "is the kind model.conv: auto picks at each tau"
        ),
    )
    p_fmnist.add_argument(
        "--size", choices=["s", "m"], help="without --config: fmnist_convnet_s (default) or _m"
    )
    p_fmnist.add_argument(
        "--n-train", type=positive_int, help="first N training images (default: the config's, else all)"
    )
    p_fmnist.add_argument(
        "--n-test", type=positive_int, help="first N test images (default: the config's, else all 10,000)"
    )
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
        "--tau",
        type=positive_float,
        help="τ of τ-CE (τ multiplies the logits; default: the config's, else 5)",
    )
    p_fmnist.add_argument("--taus", type=positive_float_list, help="one row per τ and model, e.g. 0.5,5,50")
    p_fmnist.add_argument(
        "--lr", type=positive_float, help="learning rate (default: the config's, else Adam 2e-3)"
    )
    p_fmnist.add_argument("--batch-size", type=positive_int, help="default: the config's, else 128")
    p_fmnist.add_argument("--seed", type=non_negative_int, help="default: the config's, else 0")
    p_fmnist.add_argument(
        "--seeds",
        type=seed_list,
        help="one run per seed in --out/seed<N>, then their mean and standard deviation per network "
        "(fmnist_seeds.md, as lipnet bench seeds); e.g. 0,1,2",
    )
    p_fmnist.add_argument(
        "--time-rounds",
        type=non_negative_int,
        default=0,
        help=f"first time every model's training step: N interleaved rounds of {TIME_STEPS} steps in this "
        "process (timing.json; default 0: not timed)",
    )
    p_fmnist.add_argument("--device", help="auto (default: CUDA when available), cpu, cuda")
    p_fmnist.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p_fmnist.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: Debian's when present)")
    p_fmnist.add_argument(
        "--out",
        default="runs/fmnist",
        help="folder of fmnist.csv / fmnist.md, rows/ (finished rows, read back when the bench runs "
        "again with the same setup) and timing.json",
    )
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

    p_seeds = bench_sub.add_parser(
        "seeds",
        help="mean and standard deviation over seeds of lipnet bench fmnist folders, and lipnet's paired "
        "differences against the anchors (no training)",
    )
    p_seeds.add_argument(
        "folders",
        nargs="+",
        metavar="DIR",
        help="lipnet bench fmnist --out folders of one setup at two or more --seed values (a seed may be "
        "split over several folders, each network once per seed)",
    )
    p_seeds.add_argument(
        "--models",
        type=name_list,
        help="comma-separated library:kind names of the rows to use (default: every row); lipnet:auto is "
        "the network model.conv: auto trains at each tau (today's rule)",
    )
    p_seeds.add_argument("--out", help="also write the Markdown tables to this file")
    p_seeds.set_defaults(func=run_seeds)

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
