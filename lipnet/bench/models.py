"""``lipnet bench models``: a model family built from each layer kind and from the anchor libraries' layers.

Training table (:func:`bench_models`). The default is :func:`~lipnet.models.lipconvnet.lipconvnet_m` (the
ConvNet of Prach, Brau, Buttazzo & Lampert, "1-Lipschitz Layers Compared: Memory, Speed, and Certifiable
Robustness", CVPR 2024) at batch 256 on 3x32x32 inputs on CUDA, and
:func:`~lipnet.models.lipconvnet.lipconvnet_xs` at batch 32 on CPU, where size M takes seconds per step.
The same architecture is built with every lipnet layer kind (``lipnet:<kind>``) and, for the kinds with an
anchor (:data:`lipnet.bench.anchors.ANCHORS`), from the anchor library's layers
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

import inspect
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import certify
from lipnet.bench import cell, markdown_table, timed
from lipnet.bench.anchors import ANCHORS
from lipnet.bench.modes import WARMUP, check_modes, prepare, step_begin
from lipnet.export import export
from lipnet.layers.batching import batch_weights
from lipnet.layers.kinds import LayerKind, list_layer_kinds
from lipnet.models import create, list_models, model_entrypoint

__all__ = [
    "EPOCH_IMAGES",
    "EVAL_KWARGS",
    "PUBLISHED_A100_S_PER_EPOCH",
    "Implementation",
    "bench_certify",
    "bench_eval",
    "bench_models",
    "certify_markdown",
    "eval_markdown",
    "implementations",
    "models_markdown",
    "plain_share",
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
class Implementation:
    """One row of the training table: a lipnet kind, or the anchor of ``kind`` from ``library``."""

    label: str
    kind: str
    layers: str | LayerKind
    is_anchor: bool


def implementations(kinds: Sequence[str], anchors: bool) -> tuple[list[Implementation], list[str]]:
    """The rows for ``kinds`` (each followed by its anchor, configured as lipnet's kind, when ``anchors``)
    and the labels of the anchors whose library is not installed."""
    rows: list[Implementation] = []
    missing: list[str] = []
    for kind in kinds:
        rows.append(Implementation(f"lipnet:{kind}", kind, kind, False))
        if anchors and kind in ANCHORS:
            anchor = ANCHORS[kind]
            try:
                layers = anchor.layers(as_lipnet=True)
            except ImportError:
                missing.append(anchor.label)
                continue
            rows.append(Implementation(anchor.label, kind, layers, True))
    return rows, missing


def _build(model: str, impl: Implementation, input_size: int) -> nn.Module:
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
    modes: Sequence[str] = ("eager",),
    backend: str = "inductor",
) -> list[dict[str, Any]]:
    """Median training step and eval forward of ``model`` built with each layer kind and with its anchor,
    in each mode (:mod:`lipnet.bench.modes`: ``eager``, ``compile``, ``graph``; ``backend`` the compiler's).

    ``kinds`` defaults to every registered kind; with ``anchors`` each kind with an anchor
    (:data:`lipnet.bench.anchors.ANCHORS`) is followed by the same architecture built from the
    anchor library's layers (skipped, and listed by :func:`run`, when that library is not installed).
    lipnet's models compute their Björck weights in batched calls
    (:func:`~lipnet.layers.batching.batch_weights`).
    Training step: forward on a ``(batch, 3, input_size, input_size)`` uniform batch, cross-entropy
    against random labels, backward, Adam step. Eval forward: under ``torch.no_grad`` in eval mode, after
    the warm-up calls (so eval caches hold the current weights), of the model and, in the eager mode, of
    ``lipnet.export(model)``. Every (implementation, mode) pair is timed in each round, interleaved. Times
    in ms; ``images_per_s`` and ``s_per_epoch`` follow from the training step; ``published_s_per_epoch``
    is :data:`PUBLISHED_A100_S_PER_EPOCH` for the method (``None`` when the paper has none).
    ``train_vs_anchor`` / ``eval_vs_anchor``: this row's median over the anchor row's of the same kind and
    mode (1 on the anchor row, ``None`` without one). ``plain_eval_ms`` / ``eval_vs_plain`` are ``None``
    outside the eager mode and for an anchor whose export fails or computes another function;
    ``plain_share`` is :func:`plain_share` of the export. ``timer`` is the clock
    (:func:`lipnet.bench.timed`), replaceable for tests.
    """
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
    chosen_modes = check_modes(modes, backend)
    impls, _ = implementations(chosen, anchors)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, input_size, input_size, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    nets: list[nn.Module] = []
    for impl in impls:
        torch.manual_seed(seed)
        net = _build(model, impl, input_size).to(dev)
        nets.append(net if impl.is_anchor else batch_weights(net))
    opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]
    keys = [(i, mode) for mode in chosen_modes for i in range(len(nets))]
    runs = {(i, mode): prepare(nets[i], mode, backend) for i, mode in keys}

    def train_step(key: tuple[int, str]) -> Callable[[], None]:
        i, mode = key

        def step() -> None:
            step_begin(mode)
            opts[i].zero_grad(set_to_none=True)
            nn.functional.cross_entropy(runs[key](x), y).backward()
            opts[i].step()

        return step

    def eval_forward(key: tuple[int, str]) -> Callable[[], None]:
        def forward() -> None:
            step_begin(key[1])
            runs[key](x)

        return forward

    steps = {key: train_step(key) for key in keys}
    forwards = {key: eval_forward(key) for key in keys}
    for key in keys:  # warm-up: compilation, lazy initialisation, allocator, caches, CUDA graphs
        for _ in range(WARMUP[key[1]]):
            nets[key[0]].train()
            steps[key]()
            nets[key[0]].eval()
            with torch.no_grad():
                forwards[key]()
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
    train: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    evals: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    plain_evals: list[list[float]] = [[] for _ in nets]
    for _ in range(rounds):
        for key in keys:
            i, mode = key
            net = nets[i]
            net.train()
            train[key].append(timer(steps[key], dev))
            net.eval()
            with torch.no_grad():
                forwards[key]()
                evals[key].append(timer(forwards[key], dev))
                plain = plains[i]
                if plain is not None and mode == "eager":
                    plain(x)
                    plain_evals[i].append(timer(lambda plain=plain: plain(x), dev))
    train_med = {key: statistics.median(t) for key, t in train.items()}
    eval_med = {key: statistics.median(e) for key, e in evals.items()}
    anchor_of = {impl.kind: i for i, impl in enumerate(impls) if impl.is_anchor}
    rows: list[dict[str, Any]] = []
    for i, mode in keys:
        impl = impls[i]
        tr, ev = train_med[(i, mode)], eval_med[(i, mode)]
        eager = mode == "eager"
        pev = statistics.median(plain_evals[i]) if eager and plain_evals[i] else None
        a = anchor_of.get(impl.kind)
        plain = plains[i]
        rows.append(
            {
                "implementation": impl.label,
                "kind": impl.kind,
                "mode": mode,
                "anchor": impl.is_anchor,
                "train_ms": 1e3 * tr,
                "images_per_s": batch / tr,
                "s_per_epoch": EPOCH_IMAGES * tr / batch,
                "published_s_per_epoch": PUBLISHED_A100_S_PER_EPOCH.get(impl.kind),
                "train_vs_anchor": _ratio(tr, None if a is None else train_med[(a, mode)]),
                "eval_ms": 1e3 * ev,
                "eval_vs_anchor": _ratio(ev, None if a is None else eval_med[(a, mode)]),
                "plain_eval_ms": None if pev is None else 1e3 * pev,
                "eval_vs_plain": None if pev is None else ev / pev,
                "plain_share": None if plain is None else plain_share(plain),
            }
        )
    return rows


def bench_certify(
    *,
    model: str = "lipconvnet_m",
    kinds: Sequence[str] = ("cpl",),
    n: int = 10_000,
    batch: int = 256,
    input_size: int = 32,
    rounds: int = 3,
    device: str = "cpu",
    seed: int = 0,
    timer: Timer = timed,
) -> list[dict[str, Any]]:
    """Time to certify ``n`` images against one eval pass over the same images, for ``model`` with each kind.

    The images are uniform ``(3, input_size, input_size)`` tensors with random labels, already on the device
    in batches of ``batch`` (synthetic: the time does not depend on the data). The eval pass runs the model
    on every batch under ``torch.no_grad`` in eval mode; certification is :func:`certify.certify` on the same
    batches (the float64 bound of the model, computed once from its weights, the float32 forward with
    autocast off, the radii), as ``lipnet train`` and ``lipnet certify`` run it. Each round times both, in
    alternating order, after one untimed pass of each; medians over ``rounds`` in seconds and their ratio
    (the issue-14 target: ``certify_s / eval_s <= 1.1``).
    """
    if n < 1 or batch < 1 or rounds < 1 or input_size < 1:
        raise ValueError(
            f"n, batch, rounds and input_size must be >= 1, got {n}, {batch}, {rounds}, {input_size}"
        )
    known = list_layer_kinds()
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise ValueError(f"unknown layer kind(s) {', '.join(unknown)}; known kinds: {', '.join(known)}")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    sizes = [min(batch, n - start) for start in range(0, n, batch)]
    batches = [
        (
            torch.rand(b, 3, input_size, input_size, generator=gen).to(dev),
            torch.randint(0, 10, (b,), generator=gen).to(dev),
        )
        for b in sizes
    ]
    rows: list[dict[str, Any]] = []
    for kind in dict.fromkeys(kinds):
        torch.manual_seed(seed)
        net = create(model, conv=kind, input_size=input_size).to(dev).eval()

        def eval_pass(net: nn.Module = net) -> None:
            with torch.no_grad():
                for x, _ in batches:
                    net(x)

        def certify_pass(net: nn.Module = net) -> None:
            certify.certify(net, batches, progress=False)

        eval_pass()
        certify_pass()
        evals: list[float] = []
        certs: list[float] = []
        for r in range(rounds):
            pair = ((eval_pass, evals), (certify_pass, certs))
            for fn, sink in pair if r % 2 == 0 else pair[::-1]:
                sink.append(timer(fn, dev))
        ev, ce = statistics.median(evals), statistics.median(certs)
        row = {"model": model, "kind": kind, "n": n, "batch": batch, "eval_s": ev, "certify_s": ce}
        rows.append({**row, "ratio": ce / ev})
    return rows


def certify_markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    """The rows of :func:`bench_certify` as a Markdown table under ``header``."""
    columns = ["model", "kind", "images", "batch", "eval pass (s)", "certify (s)", "certify / eval"]
    return markdown_table(
        header,
        columns,
        (
            [str(r["model"]), str(r["kind"]), str(r["n"]), str(r["batch"]), f"{r['eval_s']:.3f}",
             f"{r['certify_s']:.3f}", f"{r['ratio']:.2f}"]
            for r in rows
        ),
    )  # fmt: skip


def _eval_models(models: Sequence[str] | None) -> list[str]:
    known = list_models()
    chosen = list(dict.fromkeys(models)) if models else known
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; known models: {', '.join(known)}")
    return chosen


def _takes_conv(name: str) -> bool:
    """Whether the constructor registered as ``name`` has a ``conv`` (layer kind) argument."""
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
        "implementation", "kind", "mode", "train step (ms)", "images/s", "s per 50k epoch",
        "published A100 s/epoch (M)", "train / anchor", "eval forward (ms)", "eval / anchor",
        "exported eval (ms)", "eval / exported", "plain share",
    ]  # fmt: skip
    return markdown_table(
        header,
        columns,
        (
            [str(r["implementation"]), str(r["kind"]), str(r["mode"]), f"{r['train_ms']:.1f}",
             f"{r['images_per_s']:.1f}",
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
