"""``lipnet bench models``: a model family built from each layer kind and from the anchor libraries' layers.

Training table (:func:`bench_models`). The default is :func:`~lipnet.models.lipconvnet.lipconvnet_m` (the
ConvNet of Prach, Brau, Buttazzo & Lampert, "1-Lipschitz Layers Compared: Memory, Speed, and Certifiable
Robustness", CVPR 2024) at batch 256 on 3x32x32 inputs on CUDA, and
:func:`~lipnet.models.lipconvnet.lipconvnet_xs` at batch 32 on CPU, where size M takes seconds per step.
The same architecture is built with every lipnet layer kind (``lipnet:<kind>``) and, for the kinds with an
anchor (:data:`lipnet.bench_anchors.MODEL_ANCHORS`), from the anchor library's layers
(``orthogonium:aol``, ``deel-torchlip:spectral``, ...), all timed in one process with interleaved rounds
(median over rounds), so machine load hits all of them alike. Reported next to each: the implied seconds
per 50,000-image epoch and the paper's (:data:`PUBLISHED_A100_S_PER_EPOCH`, size M on one A100), the
training step and eval forward relative to the anchor of the same method, and the eval forward against
the same network with plain frozen weights (:func:`lipnet.export`).

Eval table (:func:`bench_eval`, ``--eval-only``): every registered model at a small size
(:data:`EVAL_KWARGS`) with every layer kind it takes, eval forward against its export, with warm-up,
alternating order and many rounds (min and median). The target is eval / exported <= 1.1. The export
freezes every layer (:mod:`lipnet.export`: SLL / CPL blocks become a plain ``nn.Conv2d`` and
``nn.ConvTranspose2d`` in a residual step, Cayley an FFT with a frozen symbol); the column ``plain share``
says which fraction of the exported parameters sits in plain torch convolution and linear layers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lipnet.bench import cell, device_label, markdown_table, timed
from lipnet.layers.kinds import LayerKind
from lipnet.train import resolve_device

__all__ = [
    "EPOCH_IMAGES",
    "EVAL_KWARGS",
    "PUBLISHED_A100_S_PER_EPOCH",
    "bench_eval",
    "bench_models",
    "eval_markdown",
    "models_markdown",
    "plain_share",
    "run",
]

#: Images per CIFAR-10 training epoch, the unit of the published timings.
EPOCH_IMAGES = 50_000

#: Seconds per 50k-image training epoch of LipConvNet-M on one A100 (Prach et al., CVPR 2024), by layer.
#: SOC and LOT are not lipnet kinds; they are listed in the table's header.
PUBLISHED_A100_S_PER_EPOCH: dict[str, float] = {
    "cpl": 13.8,
    "aol": 19.6,
    "soc": 35.8,
    "cayley": 102.9,
    "lot": 654.5,
}

#: Keyword arguments that keep a registered model small in the eval table (a registered model not listed
#: here is built with its defaults): lower input sizes for the wide families.
EVAL_KWARGS: dict[str, dict[str, int]] = {
    "lipconvnet_s": {"input_size": 16},
    "lipconvnet_m": {"input_size": 8},
    "lipconvnet_l": {"input_size": 4},
    "liresnet": {"input_size": 16},
    "sll_small": {"input_size": 8},
    "sll_medium": {"input_size": 8},
    "sll_large": {"input_size": 8},
    "sll_xlarge": {"input_size": 8},
}

#: Relative difference above which an export is taken not to compute the model's function.
_EXPORT_TOL = 1e-5

Timer = Callable[[Callable[[], object], torch.device], float]


def plain_share(model: nn.Module) -> float:
    """Fraction of ``model``'s parameters held by modules of type exactly ``nn.Conv2d``,
    ``nn.ConvTranspose2d`` or ``nn.Linear``.

    Parametrized layers (torch generates a subclass for them) and every other module count as not plain;
    a model without parameters has share 1.
    """
    total = sum(p.numel() for p in model.parameters())
    plain = sum(
        p.numel()
        for m in model.modules()
        if type(m) in (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
        for p in m.parameters(recurse=False)
    )
    return 1.0 if total == 0 else plain / total


def _export_diff(model: nn.Module, exported: nn.Module, x: Tensor) -> float:
    """Largest ``|exported(x) - model(x)|`` relative to ``max(1, max |model(x)|)``, both in eval mode."""
    with torch.no_grad():
        y = model(x)
        return float((exported(x) - y).abs().max()) / max(1.0, float(y.abs().max()))


@dataclass(frozen=True)
class _Implementation:
    """One row of the training table: a lipnet kind, or the anchor of ``kind`` from ``library``."""

    label: str
    kind: str
    layers: str | LayerKind
    is_anchor: bool


def _implementations(kinds: Sequence[str], anchors: bool) -> tuple[list[_Implementation], list[str]]:
    """The rows for ``kinds`` (each followed by its anchor when ``anchors``) and the missing anchors."""
    from lipnet.bench_anchors import MODEL_ANCHORS, anchor_kind

    rows: list[_Implementation] = []
    missing: list[str] = []
    for kind in kinds:
        rows.append(_Implementation(f"lipnet:{kind}", kind, kind, False))
        if anchors and kind in MODEL_ANCHORS:
            try:
                library, layers = anchor_kind(kind)
            except ImportError:
                missing.append(f"{MODEL_ANCHORS[kind][0]}:{MODEL_ANCHORS[kind][1]}")
                continue
            rows.append(_Implementation(f"{library}:{layers.name}", kind, layers, True))
    return rows, missing


def _build(model: str, impl: _Implementation, input_size: int) -> nn.Module:
    from lipnet.models import create

    try:
        return create(model, conv=impl.layers, input_size=input_size)
    except ValueError as err:
        if impl.is_anchor:
            raise ValueError(
                f"{model} could not be built from {impl.label}'s layers ({err}); the anchor rows need a "
                "model whose conv= takes a LayerKind (lipconvnet_*): pass --no-anchors for the others"
            ) from err
        raise


def _ratio(value: float, reference: float | None) -> float | None:
    return None if reference is None else value / reference


def bench_models(
    *,
    model: str = "lipconvnet_m",
    kinds: Sequence[str] | None = None,
    anchors: bool = True,
    batch: int = 256,
    input_size: int = 32,
    rounds: int = 5,
    device: str = "cpu",
    seed: int = 0,
    timer: Timer = timed,
) -> list[dict[str, Any]]:
    """Median training step and eval forward of ``model`` built with each layer kind and with its anchor.

    ``kinds`` defaults to every registered kind; with ``anchors`` each kind with an anchor
    (:data:`lipnet.bench_anchors.MODEL_ANCHORS`) is followed by the same architecture built from the
    anchor library's layers (skipped, and listed by :func:`run`, when that library is not installed).
    Training step: forward on a ``(batch, 3, input_size, input_size)`` uniform batch, cross-entropy
    against random labels, backward, Adam step. Eval forward: under ``torch.no_grad`` in eval mode, after
    one untimed eval forward (so eval caches hold the current weights), of the model and of
    ``lipnet.export(model)``. Times in ms; ``images_per_s`` and ``s_per_epoch`` follow from the training
    step; ``published_s_per_epoch`` is :data:`PUBLISHED_A100_S_PER_EPOCH` for the method (``None`` when
    the paper has none). ``train_vs_anchor`` / ``eval_vs_anchor``: this row's median over the anchor
    row's of the same kind (1 on the anchor row, ``None`` without one). ``plain_eval_ms`` /
    ``eval_vs_plain`` are ``None`` for an anchor whose export fails or computes another function;
    ``plain_share`` is :func:`plain_share` of the export. ``timer`` is the clock
    (:func:`lipnet.bench.timed`), replaceable for tests.
    """
    from lipnet.export import export
    from lipnet.layers.kinds import list_layer_kinds

    known = list_layer_kinds()
    chosen = list(dict.fromkeys(kinds)) if kinds else known
    unknown = [k for k in chosen if k not in known]
    if unknown:
        raise ValueError(f"unknown layer kind(s) {', '.join(unknown)}; known kinds: {', '.join(known)}")
    if batch < 1 or rounds < 1 or input_size < 1:
        raise ValueError(
            f"batch, input_size and rounds must be >= 1, got batch={batch}, input_size={input_size}, "
            f"rounds={rounds}"
        )
    impls, _ = _implementations(chosen, anchors)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, input_size, input_size, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    nets: list[nn.Module] = []
    for impl in impls:
        torch.manual_seed(seed)
        nets.append(_build(model, impl, input_size).to(dev))
    opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]

    def train_step(i: int) -> Callable[[], None]:
        def step() -> None:
            opts[i].zero_grad(set_to_none=True)
            nn.functional.cross_entropy(nets[i](x), y).backward()
            opts[i].step()

        return step

    steps = [train_step(i) for i in range(len(nets))]
    for i, net in enumerate(nets):  # warm-up: lazy initialisation, allocator, caches
        net.train()
        steps[i]()
        steps[i]()
    plains: list[nn.Module | None] = []
    for impl, net in zip(impls, nets, strict=True):
        net.eval()
        try:
            plain = export(net)
        except (RuntimeError, TypeError, ValueError):
            if not impl.is_anchor:
                raise
            plain = None
        if plain is not None and _export_diff(net, plain, x) > _EXPORT_TOL:
            if not impl.is_anchor:
                raise RuntimeError(
                    f"lipnet.export({impl.label} {model}) does not reproduce the model's outputs"
                )
            plain = None
        plains.append(plain)
    train: list[list[float]] = [[] for _ in nets]
    evals: list[list[float]] = [[] for _ in nets]
    plain_evals: list[list[float]] = [[] for _ in nets]
    for _ in range(rounds):
        for i, net in enumerate(nets):
            net.train()
            train[i].append(timer(steps[i], dev))
            net.eval()
            with torch.no_grad():
                net(x)
                evals[i].append(timer(lambda net=net: net(x), dev))
                plain = plains[i]
                if plain is not None:
                    plain(x)
                    plain_evals[i].append(timer(lambda plain=plain: plain(x), dev))
    train_med = [statistics.median(t) for t in train]
    eval_med = [statistics.median(e) for e in evals]
    anchor_of = {impl.kind: i for i, impl in enumerate(impls) if impl.is_anchor}
    rows: list[dict[str, Any]] = []
    for i, impl in enumerate(impls):
        tr, ev = train_med[i], eval_med[i]
        pev = statistics.median(plain_evals[i]) if plain_evals[i] else None
        a = anchor_of.get(impl.kind)
        plain = plains[i]
        rows.append(
            {
                "implementation": impl.label,
                "kind": impl.kind,
                "anchor": impl.is_anchor,
                "train_ms": 1e3 * tr,
                "images_per_s": batch / tr,
                "s_per_epoch": EPOCH_IMAGES * tr / batch,
                "published_s_per_epoch": PUBLISHED_A100_S_PER_EPOCH.get(impl.kind),
                "train_vs_anchor": _ratio(tr, None if a is None else train_med[a]),
                "eval_ms": 1e3 * ev,
                "eval_vs_anchor": _ratio(ev, None if a is None else eval_med[a]),
                "plain_eval_ms": None if pev is None else 1e3 * pev,
                "eval_vs_plain": None if pev is None else ev / pev,
                "plain_share": None if plain is None else plain_share(plain),
            }
        )
    return rows


def _eval_models(models: Sequence[str] | None) -> list[str]:
    from lipnet.models import list_models

    known = list_models()
    chosen = list(dict.fromkeys(models)) if models else known
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; known models: {', '.join(known)}")
    return chosen


def _takes_conv(name: str) -> bool:
    """Whether the constructor registered as ``name`` has a ``conv`` (layer kind) argument."""
    import inspect

    from lipnet.models import model_entrypoint

    return "conv" in inspect.signature(model_entrypoint(name)).parameters


def bench_eval(
    *,
    models: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    batch: int = 32,
    rounds: int = 30,
    warmup: int = 3,
    device: str = "cpu",
    seed: int = 0,
    timer: Timer = timed,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Eval forward of each model with each kind against ``lipnet.export`` of it; ``(rows, skipped)``.

    ``models`` defaults to every registered model, built with :data:`EVAL_KWARGS`; a model whose
    constructor takes ``conv=`` is built with each of ``kinds`` (default: every registered kind), and
    the kinds its constructor refuses (``ValueError``) are listed in ``skipped`` as ``"model:kind"``.
    Each model and its export get ``warmup`` untimed forwards on a ``(batch, *model.input_shape)``
    uniform batch, then ``rounds`` timed forwards each under ``torch.no_grad`` in eval mode, alternating
    which of the two goes first from round to round and interleaving all the pairs within a round.
    Rows: ``model``, ``kind`` (``None`` for models without ``conv=``), ``params`` (millions),
    ``plain_share`` of the export, ``eval_min_ms`` / ``eval_median_ms``, ``exported_min_ms`` /
    ``exported_median_ms``, ``ratio_median`` (median over median) and ``ratio_min`` (min over min), and
    ``max_diff``, the largest output difference relative to ``max(1, max |output|)``; an export that
    differs by more than 1e-5 is a bug and raises ``RuntimeError``. ``timer`` is the clock
    (:func:`lipnet.bench.timed`), replaceable for tests.
    """
    from lipnet.export import export
    from lipnet.layers.kinds import list_layer_kinds
    from lipnet.models import create

    if batch < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"batch and rounds must be >= 1 and warmup >= 0, got {batch}, {rounds}, {warmup}")
    known_kinds = list_layer_kinds()
    chosen_kinds = list(dict.fromkeys(kinds)) if kinds else known_kinds
    unknown = [k for k in chosen_kinds if k not in known_kinds]
    if unknown:
        raise ValueError(f"unknown layer kind(s) {', '.join(unknown)}; known kinds: {', '.join(known_kinds)}")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    pairs: list[tuple[str, str | None, nn.Module, nn.Module, Tensor, float]] = []
    skipped: list[str] = []
    for name in _eval_models(models):
        for kind in chosen_kinds if _takes_conv(name) else [None]:
            extra = {} if kind is None else {"conv": kind}
            torch.manual_seed(seed)
            try:
                net = create(name, **EVAL_KWARGS.get(name, {}), **extra)
            except ValueError:
                if kind is None:
                    raise
                skipped.append(f"{name}:{kind}")
                continue
            net = net.to(dev).eval()
            x = torch.rand(batch, *net.input_shape, generator=gen).to(dev)
            plain = export(net)
            diff = _export_diff(net, plain, x)
            if diff > _EXPORT_TOL:
                raise RuntimeError(f"lipnet.export({name}, conv={kind}) differs from the model by {diff:.2e}")
            pairs.append((name, kind, net, plain, x, diff))
    with torch.no_grad():
        for _, _, net, plain, x, _ in pairs:
            for _ in range(warmup):
                net(x)
                plain(x)
        times: list[tuple[list[float], list[float]]] = [([], []) for _ in pairs]
        for r in range(rounds):
            for (_, _, net, plain, x, _), (own, exported) in zip(pairs, times, strict=True):
                first, second = (
                    ((net, own), (plain, exported)) if r % 2 == 0 else ((plain, exported), (net, own))
                )
                for module, sink in (first, second):
                    sink.append(timer(lambda module=module, x=x: module(x), dev))
    rows: list[dict[str, Any]] = []
    for (name, kind, net, plain, _, diff), (own, exported) in zip(pairs, times, strict=True):
        med, pmed = statistics.median(own), statistics.median(exported)
        rows.append(
            {
                "model": name,
                "kind": kind,
                "params": sum(p.numel() for p in net.parameters()) / 1e6,
                "plain_share": plain_share(plain),
                "eval_min_ms": 1e3 * min(own),
                "eval_median_ms": 1e3 * med,
                "exported_min_ms": 1e3 * min(exported),
                "exported_median_ms": 1e3 * pmed,
                "ratio_median": med / pmed,
                "ratio_min": min(own) / min(exported),
                "max_diff": diff,
            }
        )
    return rows, skipped


def models_markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    """The rows of :func:`bench_models` as a Markdown table under ``header``."""
    columns = [
        "implementation", "kind", "train step (ms)", "images/s", "s per 50k epoch",
        "published A100 s/epoch (M)", "train / anchor", "eval forward (ms)", "eval / anchor",
        "exported eval (ms)", "eval / exported", "plain share",
    ]  # fmt: skip
    return markdown_table(
        header,
        columns,
        (
            [str(r["implementation"]), str(r["kind"]), f"{r['train_ms']:.1f}", f"{r['images_per_s']:.1f}",
             f"{r['s_per_epoch']:.1f}", cell(r["published_s_per_epoch"], ".1f"),
             cell(r["train_vs_anchor"], ".2f"), f"{r['eval_ms']:.2f}", cell(r["eval_vs_anchor"], ".2f"),
             cell(r["plain_eval_ms"], ".2f", "n/a"), cell(r["eval_vs_plain"], ".2f", "n/a"),
             cell(r["plain_share"], ".2f", "n/a")]
            for r in rows
        ),
    )  # fmt: skip


def eval_markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    """The rows of :func:`bench_eval` as a Markdown table under ``header``."""
    columns = [
        "model", "kind", "parameters (M)", "plain share", "eval min (ms)", "eval median (ms)",
        "exported min (ms)", "exported median (ms)", "eval / exported (median)", "eval / exported (min)",
        "max rel. diff",
    ]  # fmt: skip
    return markdown_table(
        header,
        columns,
        (
            [str(r["model"]), str(r["kind"] or "–"), f"{r['params']:.2f}", f"{r['plain_share']:.2f}",
             f"{r['eval_min_ms']:.2f}", f"{r['eval_median_ms']:.2f}", f"{r['exported_min_ms']:.2f}",
             f"{r['exported_median_ms']:.2f}", f"{r['ratio_median']:.2f}", f"{r['ratio_min']:.2f}",
             f"{r['max_diff']:.1e}"]
            for r in rows
        ),
    )  # fmt: skip


def _emit(out: str | None, text: str, body: dict[str, object]) -> None:
    """Print the table ``text``; with ``out``, write it there (``.md``) or ``body`` as JSON (else)."""
    from lipnet.runs import atomic_write_text

    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n" if path.suffix == ".md" else json.dumps(body, indent=2))


def _run_eval(args: argparse.Namespace, device: str) -> int:
    batch = args.batch or 32
    rounds = args.rounds or 30
    rows, skipped = bench_eval(
        models=args.models, kinds=args.kinds, batch=batch, rounds=rounds, device=device
    )
    header = (
        f"Eval forward vs lipnet.export (plain frozen weights), batch {batch}, {device_label(device)}, "
        f"torch {torch.__version__}; every model at a small size (lipnet.bench_models.EVAL_KWARGS), 3 "
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


def run(args: argparse.Namespace) -> int:
    """CLI entry: ``lipnet bench models [--model M] [--batch B] [--input-size S] [--kinds K,..]
    [--no-anchors] [--rounds N] [--device D]``, or ``--eval-only [--models M,..]`` for :func:`bench_eval`.

    Without ``--model`` / ``--batch``: ``lipconvnet_m`` at batch 256 on CUDA, ``lipconvnet_xs`` at batch
    32 on CPU (the header says which). ``--out F`` writes the Markdown table when ``F`` ends in ``.md``,
    else the rows as JSON.
    """
    device = str(resolve_device(args.device or "auto"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_only:
        return _run_eval(args, device)
    from lipnet.bench_anchors import MODEL_ANCHORS
    from lipnet.layers.kinds import list_layer_kinds

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
    )
    defaults = "" if on_cuda or args.model else " (the CPU default; lipconvnet_m at batch 256 on CUDA)"
    published = ", ".join(f"{k} {v:g} s" for k, v in PUBLISHED_A100_S_PER_EPOCH.items())
    header = (
        f"{model}{defaults}, batch {batch}x3x{size}x{size}, {device_label(device)}, "
        f"torch {torch.__version__}; medians over {rounds} interleaved rounds. Train step: forward + "
        "cross-entropy + backward + Adam; "
        f"s per epoch = {EPOCH_IMAGES:,} images at that rate. Published (Prach et al., CVPR 2024, "
        f"LipConvNet-M on one A100, s per 50k-image epoch): {published}. Eval: no_grad, eval mode, warm "
        "caches, against lipnet.export(model) (plain frozen weights; n/a where the export fails or differs); "
        "target eval / exported <= 1.1; plain share: fraction of the exported parameters in plain "
        "nn.Conv2d / nn.ConvTranspose2d / nn.Linear."
    )
    if anchors:
        pairs = ", ".join(f"lipnet:{k} vs {lib}:{name}" for k, (lib, name) in MODEL_ANCHORS.items())
        header += (
            " Anchors (the same architecture from the anchor library's layers; ratios lipnet / anchor): "
            f"{pairs}."
        )
        _, missing = _implementations(args.kinds or list_layer_kinds(), anchors)
        if missing:
            header += f" Not installed, skipped: {', '.join(missing)}."
    body = {"device": device_label(device), "model": model, "batch": batch, "rows": rows}
    _emit(args.out, models_markdown(rows, header), body)
    return 0
