"""``lipnet bench kernels``: the ATen operations one training step dispatches, per layer kind and library.

On a GPU a small 1-Lipschitz network is launch-bound: its training step is a few hundred small kernels,
each costing microseconds of launch and dispatch whatever its size. The number of operations a step
dispatches is that cost, it is deterministic, and it can be counted without a GPU. :func:`count_step`
counts, under a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, the ATen operations of one
training step (``zero_grad``, forward, cross-entropy, backward, Adam step with ``foreach=True``, the
optimiser's CUDA default) after two warm-up steps: every operation that reaches the dispatcher below
autograd, forward and backward (a composite operation counts as the operations it decomposes into), and
separately the ``kernels``, those that are not views (a view launches nothing; the rest is an upper
proxy of the kernels a GPU launches, which fusing compilers lower further).

:func:`bench_kernels` counts one network layout (``small_cnn``: :func:`lipnet.bench.layers.network`
at width 32; ``bethune_vgg``: the model at its default widths) built from every registered layer kind,
from each anchor library's layers configured as lipnet's kind (:data:`lipnet.bench.anchors.ANCHORS`,
``as_lipnet=True``), and from plain unconstrained layers (:data:`lipnet.bench.layers.PLAIN`), with the
same activation and pooling everywhere, so that only the layers differ. lipnet's networks carry
:func:`~lipnet.layers.batching.batch_weights` with the batching a CUDA device gets
(:data:`~lipnet.layers.batching.MAX_PADDING`); the Björck network is also counted with the CPU's
batching and without batching (``[per layer]``). Counts do not depend on the batch size.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lipnet.activations import GroupSort
from lipnet.bench import cell, markdown_table
from lipnet.bench.anchors import ANCHORS
from lipnet.bench.layers import PLAIN, network
from lipnet.layers.batching import MAX_PADDING, batch_weights
from lipnet.layers.kinds import LayerKind, get_layer_kind, list_layer_kinds
from lipnet.models import create
from lipnet.pooling import ScaledL2NormPool2d

__all__ = ["NETWORKS", "OpCounter", "StepCount", "bench_kernels", "count_step", "kernels_markdown"]

#: The network layouts :func:`bench_kernels` knows, by name.
NETWORKS = ("small_cnn", "bethune_vgg")


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while it is active (``with OpCounter() as c: ...``).

    ``ops`` maps each operation overload to its count; operations outside the ``aten`` namespace (the
    profiler's markers) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[torch._ops.OpOverload] = collections.Counter()

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func.namespace == "aten":
            self.ops[func] += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class StepCount:
    """What one training step dispatched: ``ops`` ATen operations, ``kernels`` of them not views, and the
    count of each operation (``by_op``, keyed by its name, e.g. ``aten.bmm.default``)."""

    ops: int
    kernels: int
    by_op: dict[str, int]


def count_step(model: nn.Module, x: Tensor, y: Tensor, *, warmup: int = 2) -> StepCount:
    """The ATen operations of one training step of ``model`` on ``(x, y)`` (see the module docstring):
    ``zero_grad(set_to_none=True)``, cross-entropy of ``model(x)``, backward, ``Adam(foreach=True)`` step,
    counted after ``warmup`` identical steps (lazy initialisation, optimiser state)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    with OpCounter() as counter:
        step()
    kernels = sum(n for op, n in counter.ops.items() if not op.is_view)
    return StepCount(sum(counter.ops.values()), kernels, {str(op): n for op, n in counter.ops.items()})


@dataclass(frozen=True)
class _Row:
    """One implementation of a network: ``label``, the lipnet ``kind`` it stands for, its ``library``."""

    label: str
    kind: str
    library: str
    build: Callable[[], nn.Module]


def _small_cnn(kind: LayerKind, width: int) -> nn.Module:
    return network(kind, lambda: GroupSort(2), lambda: ScaledL2NormPool2d(2), width)


def _bethune_vgg(kind: LayerKind, width: int) -> nn.Module:
    return create("bethune_vgg", conv=kind)


_LAYOUTS: dict[str, Callable[[LayerKind, int], nn.Module]] = {
    "small_cnn": _small_cnn,
    "bethune_vgg": _bethune_vgg,
}


def _rows(layout: Callable[[LayerKind, int], nn.Module], kinds: Sequence[str], width: int) -> list[_Row]:
    cuda_batching = MAX_PADDING["cuda"]

    def lipnet(kind: str, max_padding: float | None, batched: bool = True) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            model = layout(get_layer_kind(kind), width)
            return batch_weights(model, max_padding=max_padding) if batched else model

        return build

    def anchor(kind: str) -> Callable[[], nn.Module]:
        return lambda: layout(ANCHORS[kind].layers(as_lipnet=True), width)

    rows: list[_Row] = []
    for kind in kinds:
        rows.append(_Row(f"lipnet:{kind}", kind, "lipnet", lipnet(kind, cuda_batching)))
        if kind == "bjorck":
            cpu = lipnet(kind, MAX_PADDING["cpu"])
            rows.append(_Row("lipnet:bjorck [cpu batching]", kind, "lipnet", cpu))
            rows.append(_Row("lipnet:bjorck [per layer]", kind, "lipnet", lipnet(kind, None, batched=False)))
        if kind in ANCHORS:
            rows.append(_Row(ANCHORS[kind].label, kind, ANCHORS[kind].library, anchor(kind)))
    rows.append(_Row("plain", "plain", "torch", lambda: layout(PLAIN, width)))
    return rows


def bench_kernels(
    *,
    networks: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    width: int = 32,
    batch: int = 2,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Operation counts of one training step of each network from each implementation; ``(rows, skipped)``.

    ``networks`` (default :data:`NETWORKS`) and ``kinds`` (default: every registered kind) choose the
    networks and lipnet kinds; each kind with an anchor is followed by the anchor's row, the Björck kind by
    its ``[cpu batching]`` and ``[per layer]`` rows, each network ends with ``plain``. ``width`` is
    ``small_cnn``'s (``bethune_vgg`` keeps its defaults), ``batch`` the batch of 3x32x32 inputs. Rows:
    ``network``, ``implementation``, ``kind``, ``ops``, ``kernels``, ``kernels_vs_anchor`` (over the
    anchor row of the same kind: deel-torchlip's for Björck; ``None`` without one), ``kernels_vs_plain``
    and ``ops_vs_plain``. ``skipped``: ``"network: implementation (reason)"`` for each implementation whose
    library is missing or that the layout refuses.
    """
    known = list_layer_kinds()
    chosen = list(dict.fromkeys(kinds)) if kinds else known
    unknown = [k for k in chosen if k not in known]
    if unknown:
        raise ValueError(f"unknown layer kind(s) {', '.join(unknown)}; known kinds: {', '.join(known)}")
    nets = list(dict.fromkeys(networks)) if networks else list(NETWORKS)
    bad = [n for n in nets if n not in _LAYOUTS]
    if bad:
        raise ValueError(f"unknown network(s) {', '.join(bad)}; known networks: {', '.join(NETWORKS)}")
    if width < 2 or width % 2 or batch < 1:
        raise ValueError(f"width must be even and >= 2 and batch >= 1, got width={width}, batch={batch}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for name in nets:
        counted: list[tuple[_Row, StepCount]] = []
        for row in _rows(_LAYOUTS[name], chosen, width):
            torch.manual_seed(seed)
            try:
                model = row.build()
            except (ImportError, ValueError) as err:
                skipped.append(f"{name}: {row.label} ({str(err).splitlines()[0]})")
                continue
            counted.append((row, count_step(model, x, y)))
        anchors = {row.kind: c for row, c in counted if row.library not in ("lipnet", "torch")}
        plain = next((c for row, c in counted if row.label == "plain"), None)
        for row, c in counted:
            anchor = anchors.get(row.kind)
            rows.append(
                {
                    "network": name,
                    "implementation": row.label,
                    "kind": row.kind,
                    "ops": c.ops,
                    "kernels": c.kernels,
                    "kernels_vs_anchor": None if anchor is None else c.kernels / anchor.kernels,
                    "ops_vs_anchor": None if anchor is None else c.ops / anchor.ops,
                    "kernels_vs_plain": None if plain is None else c.kernels / plain.kernels,
                    "ops_vs_plain": None if plain is None else c.ops / plain.ops,
                }
            )
    return rows, skipped


def kernels_markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    """The rows of :func:`bench_kernels` as a Markdown table under ``header``."""
    columns = [
        "network", "implementation", "ATen ops / step", "kernels (non-view) / step", "kernels / anchor",
        "kernels / plain", "ops / anchor", "ops / plain",
    ]  # fmt: skip
    return markdown_table(
        header,
        columns,
        (
            [str(r["network"]), str(r["implementation"]), str(r["ops"]), str(r["kernels"]),
             cell(r["kernels_vs_anchor"], ".2f"), cell(r["kernels_vs_plain"], ".2f"),
             cell(r["ops_vs_anchor"], ".2f"), cell(r["ops_vs_plain"], ".2f")]
            for r in rows
        ),
    )  # fmt: skip
