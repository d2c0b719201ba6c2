"""``lipnet bench layers``: training-step and eval-forward time against the anchor libraries.

One architecture (:class:`~lipnet.models.small.SmallCNN`: 4 convolutions 3x3 + 2 dense layers,
GroupSort2, scaled L2-norm pooling), built from lipnet's layers, from deel-torchlip's
(``SpectralConv2d``, ``GroupSort2``, ``ScaledL2NormPool2d``, ``SpectralLinear``), from orthogonium's
(``AdaptiveOrthoConv2d``, ``OrthoLinear``, ``MaxMin``, lipnet's pooling), the anchors as their
libraries ship them (:data:`lipnet.bench.anchors.ANCHORS`), and from plain unconstrained layers, timed
side by side in one process with interleaved rounds so that machine load hits all of them alike.
lipnet's networks compute their Björck weights in batched calls (:mod:`lipnet.layers.batching`); the
Björck network is also timed without (``[per layer]``). Each network runs in each requested mode
(:mod:`lipnet.bench.modes`: eager, ``torch.compile``, compiled with CUDA-graph capture). The reported
figure is the median over rounds; ratios are to deel-torchlip and to the plain net in the same mode.

``lipnet bench layers --per-layer`` (or ``--kinds``) times one channel-preserving layer of every
registered kind (:func:`lipnet.layers.kinds.list_layer_kinds`) next to its anchor implementation
(:data:`lipnet.bench.anchors.ANCHORS`, configured as lipnet's kind), also interleaved: training step,
eval forward, memory (bytes of the tensors saved for backward, on every device; the CUDA allocator's
peak on CUDA) and the singular-value range of the layer's exact operator on a small input
(:func:`singular_value_range`); see :func:`bench_per_layer`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from certify.exact import dense_matrix
from lipnet.activations import GroupSort
from lipnet.bench import cell, markdown_table, timed
from lipnet.bench.anchors import ANCHORS
from lipnet.bench.modes import WARMUP, check_modes, prepare, step_begin
from lipnet.export import export
from lipnet.layers.batching import batch_weights
from lipnet.layers.kinds import LayerKind, get_layer_kind, list_layer_kinds
from lipnet.models import create
from lipnet.pooling import ScaledL2NormPool2d

__all__ = [
    "OPERATOR_JACOBIAN",
    "OPERATOR_MATRIX",
    "PLAIN",
    "bench_layers",
    "bench_per_layer",
    "layer_networks",
    "layers_markdown",
    "network",
    "per_layer_markdown",
    "saved_bytes",
    "singular_value_range",
]


def network(
    kind: LayerKind, activation: Callable[[], nn.Module], pool: Callable[[], nn.Module], width: int
) -> nn.Module:
    """:class:`~lipnet.models.small.SmallCNN`'s layout on 3x32x32 inputs, 10 classes, from ``kind``'s
    layers with ``activation`` and 2x downsampling ``pool``."""
    w = width
    return nn.Sequential(
        kind.conv(3, w, 3), activation(), kind.block(w, 3), activation(), pool(),
        kind.conv(w, 2 * w, 3), activation(), kind.block(2 * w, 3), activation(), pool(),
        nn.Flatten(), kind.dense(2 * w * 64, 4 * w), activation(), kind.dense(4 * w, 10),
    )  # fmt: skip


#: The unconstrained reference kind: plain 'same' ``nn.Conv2d`` and ``nn.Linear`` layers.
PLAIN = LayerKind(
    "plain",
    lambda c, k: nn.Conv2d(c, c, k, padding=k // 2),
    lambda i, o, k: nn.Conv2d(i, o, k, padding=k // 2),
    nn.Linear,
    "unconstrained nn.Conv2d and nn.Linear",
)


def _anchor_network(kind: str, width: int) -> nn.Module:
    """The network from the anchor of lipnet's ``kind`` as its library ships it; ImportError without it."""
    anchor = ANCHORS[kind]
    return network(anchor.layers(as_lipnet=False), anchor.activation, anchor.pool, width)


def _builders(width: int) -> dict[str, Callable[[], nn.Module]]:
    return {
        "lipnet bjorck": lambda: batch_weights(create("small_cnn", width=width, conv="bjorck")),
        "lipnet bjorck [per layer]": lambda: create("small_cnn", width=width, conv="bjorck"),
        "lipnet bcop": lambda: batch_weights(create("small_cnn", width=width, conv="bcop")),
        "lipnet aol": lambda: batch_weights(create("small_cnn", width=width, conv="aol")),
        ANCHORS["bjorck"].library: lambda: _anchor_network("bjorck", width),
        ANCHORS["aoc"].library: lambda: _anchor_network("aoc", width),
        "plain": lambda: network(PLAIN, lambda: GroupSort(2), lambda: ScaledL2NormPool2d(2), width),
    }


def layer_networks() -> list[str]:
    """The names of the networks :func:`bench_layers` times (before skipping missing libraries)."""
    return list(_builders(2))


#: Networks timed in the eager mode only (they show what the batching saves, which compiled code fuses).
_EAGER_ONLY = ("lipnet bjorck [per layer]",)


def bench_layers(
    *,
    width: int = 32,
    batch: int = 64,
    rounds: int = 10,
    device: str = "cpu",
    seed: int = 0,
    modes: Sequence[str] = ("eager",),
    backend: str = "inductor",
    networks: Sequence[str] | None = None,
) -> list[dict[str, float | str | None]]:
    """Median training-step (forward, backward, Adam step) and eval-forward time of each network in each
    mode (:mod:`lipnet.bench.modes`: ``eager``, ``compile``, ``graph``; ``backend`` is the compiler's).

    lipnet's networks compute their Björck weights in batched calls
    (:func:`~lipnet.layers.batching.batch_weights`); ``lipnet bjorck [per layer]`` (eager only) is the same
    network without. ``networks`` chooses some of them by name (default: all; :func:`layer_networks` lists
    them). Every (network, mode) pair is timed in each round, interleaved. Networks whose library is not
    installed are skipped. Times are in milliseconds; ``train_vs_deel`` and ``train_vs_plain`` /
    ``eval_vs_plain`` are ratios to deel-torchlip's and to the plain network's medians in the same mode.
    """
    chosen = check_modes(modes, backend)
    builders = _builders(width)
    if networks is not None:
        unknown = [n for n in networks if n not in builders]
        if unknown:
            raise ValueError(f"unknown network(s) {', '.join(unknown)}; known: {', '.join(builders)}")
        builders = {n: builders[n] for n in builders if n in networks}
    torch.manual_seed(seed)
    dev = torch.device(device)
    x = torch.rand(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    nets: dict[str, nn.Module] = {}
    for name, build in builders.items():
        try:
            nets[name] = build().to(dev)
        except ImportError:
            continue
    runs = {
        (name, mode): prepare(net, mode, backend)
        for mode in chosen
        for name, net in nets.items()
        if mode == "eager" or name not in _EAGER_ONLY
    }
    opts = {k: torch.optim.Adam(n.parameters(), lr=1e-3) for k, n in nets.items()}

    def train_step(key: tuple[str, str]) -> None:
        name, mode = key
        step_begin(mode)
        opts[name].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(runs[key](x), y).backward()
        opts[name].step()

    def eval_forward(key: tuple[str, str]) -> None:
        step_begin(key[1])
        runs[key](x)

    train: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    evals: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for key in runs:  # warm-up: compilation, lazy initialisation, allocator, caches, CUDA graphs
        for _ in range(WARMUP[key[1]]):
            nets[key[0]].train()
            train_step(key)
            nets[key[0]].eval()
            with torch.no_grad():
                eval_forward(key)
    for _ in range(rounds):
        for key in runs:
            net = nets[key[0]]
            net.train()
            train[key].append(timed(lambda key=key: train_step(key), dev))
            net.eval()
            with torch.no_grad():
                eval_forward(key)
                evals[key].append(timed(lambda key=key: eval_forward(key), dev))
    train_med = {k: statistics.median(v) for k, v in train.items()}
    eval_med = {k: statistics.median(v) for k, v in evals.items()}
    rows: list[dict[str, float | str | None]] = []
    for name, mode in runs:
        tr, ev = train_med[(name, mode)], eval_med[(name, mode)]
        deel, plain = (ANCHORS["bjorck"].library, mode), ("plain", mode)
        rows.append(
            {
                "network": name,
                "mode": mode,
                "train_ms": 1e3 * tr,
                "eval_ms": 1e3 * ev,
                "train_vs_deel": tr / train_med[deel] if deel in train_med else None,
                "train_vs_plain": tr / train_med[plain] if plain in train_med else None,
                "eval_vs_plain": ev / eval_med[plain] if plain in eval_med else None,
            }
        )
    return rows


#: How :func:`singular_value_range` obtained the spectrum.
OPERATOR_MATRIX = "matrix"
OPERATOR_JACOBIAN = "Jacobian at random x"


@dataclass(frozen=True)
class _Layer:
    """One row of the per-layer table: a registered kind's block, or its anchor's."""

    kind: str
    implementation: str
    block: Callable[[int, int], nn.Module]
    is_anchor: bool


def _layers(kinds: Sequence[str]) -> list[_Layer]:
    out: list[_Layer] = []
    for kind in kinds:
        out.append(_Layer(kind, f"lipnet {kind}", get_layer_kind(kind).block, False))
        if kind in ANCHORS:
            anchor = ANCHORS[kind]
            try:
                block = anchor.layers(as_lipnet=True).block
            except ImportError:
                continue
            out.append(_Layer(kind, f"{anchor.library} {anchor.layer}", block, True))
    return out


def singular_value_range(
    layer: nn.Module, input_shape: tuple[int, int, int], *, seed: int = 0
) -> tuple[float, float, str]:
    """(smallest, largest singular value, how) of ``layer``'s operator on inputs of ``input_shape``.

    The layer is first :func:`lipnet.export`-ed (eval mode, plain ``nn.Conv2d`` / ``nn.Linear`` holding
    the weights it actually applies) and cast to float64, so the spectrum is that of its actual float32
    weights, computed in float64. A linear (affine) layer gives the singular values of its exact dense
    matrix (:func:`certify.exact.dense_matrix`; ``how`` is :data:`OPERATOR_MATRIX`). A nonlinear layer
    (a residual block) gives those of its Jacobian at one random standard-normal input
    (:data:`OPERATOR_JACOBIAN`): a local view, whose largest value is a lower bound of the Lipschitz
    constant, not an upper bound.
    """
    probe = export(layer, input_shape).to(device="cpu", dtype=torch.float64)
    try:
        matrix = dense_matrix(probe, input_shape)
        how = OPERATOR_MATRIX
    except ValueError:
        # the probe computes in float64 on batches, so dense_matrix's only remaining refusal is a map
        # that is not affine
        point = torch.randn(
            (1, *input_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        jac = torch.autograd.functional.jacobian(probe, point)
        matrix = jac.reshape(math.prod(jac.shape[: jac.ndim // 2]), -1)
        how = OPERATOR_JACOBIAN
    values = torch.linalg.svdvals(matrix)
    return float(values.min().item()), float(values.max().item()), how


def saved_bytes(step: Callable[[], None], exclude: set[int]) -> int:
    """Bytes of the distinct storages ``step``'s forward saves for backward, less those in ``exclude``."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by ``step`` above what was allocated before it (CUDA allocator statistics)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _ratio(value: float, anchor: float | None) -> float | None:
    return None if anchor is None else value / anchor


def bench_per_layer(
    *,
    kinds: Sequence[str] | None = None,
    channels: int = 64,
    size: int = 32,
    batch: int = 64,
    kernel_size: int = 3,
    rounds: int = 10,
    device: str = "cpu",
    sv_channels: int = 8,
    sv_size: int = 8,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One channel-preserving layer per registered kind and per anchor (:data:`~lipnet.bench.anchors.ANCHORS`,
    configured as lipnet's kind), side by side.

    Each layer maps ``(batch, channels, size, size)`` to the same shape. Measured, with the layers'
    rounds interleaved so that machine load hits all of them alike (medians over ``rounds``, in ms):
    a training step (forward, backward of ``<y, g>`` for a fixed random ``g``, Adam step; the input
    requires grad, as a hidden layer's does) and an eval forward under ``torch.no_grad`` (after one
    untimed eval forward, so eval caches are warm). Memory: MiB of the distinct tensors the training
    forward saves for backward, excluding the input and the layer's parameters and buffers
    (``saved_mib``, any device) and, on CUDA, the allocator's peak during a training step above what
    was allocated before (``cuda_peak_mib``, else ``None``). Spectrum: :func:`singular_value_range` of
    a freshly initialised layer (same seed) with ``sv_channels`` channels on ``sv_size`` x ``sv_size``.
    Ratios are to the anchor of the same kind (``None`` for kinds without one, and for the memory ratio
    when the anchor saves nothing). Anchors whose library is not installed are skipped.
    """
    known = list_layer_kinds()
    chosen = list(dict.fromkeys(kinds)) if kinds else known
    unknown = [k for k in chosen if k not in known]
    if unknown:
        raise ValueError(f"unknown layer kind(s) {', '.join(unknown)}; known kinds: {', '.join(known)}")
    for name, value in (
        ("channels", channels),
        ("size", size),
        ("batch", batch),
        ("rounds", rounds),
        ("sv_channels", sv_channels),
        ("sv_size", sv_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    dev = torch.device(device)
    layers = _layers(chosen)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen).to(dev).requires_grad_(True)
    g = torch.randn(batch, channels, size, size, generator=gen).to(dev)
    mods: list[nn.Module] = []
    for layer in layers:
        torch.manual_seed(seed)
        mods.append(layer.block(channels, kernel_size).to(dev))
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in mods]

    def train_step(i: int) -> Callable[[], None]:
        def step() -> None:
            opts[i].zero_grad(set_to_none=True)
            x.grad = None
            (mods[i](x) * g).sum().backward()
            opts[i].step()

        return step

    steps = [train_step(i) for i in range(len(mods))]
    saved: list[int] = []
    peaks: list[int | None] = []
    for i, m in enumerate(mods):
        m.train()
        steps[i]()  # lazy initialisation (e.g. the Cayley layer's grid size) before measuring
        own = {t.untyped_storage().data_ptr() for t in (*m.parameters(), *m.buffers(), x)}
        saved.append(saved_bytes(steps[i], own))
        peaks.append(_cuda_peak_bytes(steps[i], dev) if dev.type == "cuda" else None)
    train: list[list[float]] = [[] for _ in mods]
    evals: list[list[float]] = [[] for _ in mods]
    for _ in range(rounds):
        for i, m in enumerate(mods):
            m.train()
            train[i].append(timed(steps[i], dev))
            m.eval()
            with torch.no_grad():
                m(x)
                evals[i].append(timed(lambda m=m: m(x), dev))
    spectra = []
    for layer in layers:
        torch.manual_seed(seed)
        spectra.append(
            singular_value_range(
                layer.block(sv_channels, kernel_size), (sv_channels, sv_size, sv_size), seed=seed
            )
        )
    anchor_of = {layer.kind: i for i, layer in enumerate(layers) if layer.is_anchor}
    rows: list[dict[str, Any]] = []
    mib = 2.0**20
    for i, layer in enumerate(layers):
        tr, ev = statistics.median(train[i]), statistics.median(evals[i])
        a = anchor_of.get(layer.kind)
        rows.append(
            {
                "kind": layer.kind,
                "implementation": layer.implementation,
                "train_ms": 1e3 * tr,
                "eval_ms": 1e3 * ev,
                "saved_mib": saved[i] / mib,
                "cuda_peak_mib": None if peaks[i] is None else peaks[i] / mib,
                "sv_min": spectra[i][0],
                "sv_max": spectra[i][1],
                "operator": spectra[i][2],
                "train_vs_anchor": _ratio(tr, None if a is None else statistics.median(train[a])),
                "eval_vs_anchor": _ratio(ev, None if a is None else statistics.median(evals[a])),
                "saved_vs_anchor": _ratio(saved[i], None if a is None or not saved[a] else saved[a]),
            }
        )
    return rows


def layers_markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    """The rows of :func:`bench_layers` as a Markdown table under ``header``."""
    columns = [
        "network", "mode", "train step (ms)", "eval forward (ms)", "train / deel-torchlip", "train / plain",
        "eval / plain",
    ]  # fmt: skip
    return markdown_table(
        header,
        columns,
        (
            [str(r["network"]), str(r["mode"]), f"{r['train_ms']:.1f}", f"{r['eval_ms']:.1f}",
             *(cell(r[k], ".2f") for k in ("train_vs_deel", "train_vs_plain", "eval_vs_plain"))]
            for r in rows
        ),
    )  # fmt: skip


def per_layer_markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    """The rows of :func:`bench_per_layer` as a Markdown table under ``header``."""
    columns = [
        "kind", "implementation", "train step (ms)", "eval forward (ms)", "saved for backward (MiB)",
        "CUDA peak (MiB)", "σ_min", "σ_max", "operator", "train / anchor", "eval / anchor", "saved / anchor",
    ]  # fmt: skip
    return markdown_table(
        header,
        columns,
        (
            [str(r["kind"]), str(r["implementation"]), f"{r['train_ms']:.2f}", f"{r['eval_ms']:.2f}",
             f"{r['saved_mib']:.2f}", cell(r["cuda_peak_mib"], ".2f"), f"{r['sv_min']:.6f}",
             f"{r['sv_max']:.6f}", str(r["operator"]), cell(r["train_vs_anchor"], ".2f"),
             cell(r["eval_vs_anchor"], ".2f"), cell(r["saved_vs_anchor"], ".2f")]
            for r in rows
        ),
    )  # fmt: skip
