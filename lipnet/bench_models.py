"""``lipnet bench models``: one training step of a model family with each layer kind, in images per second.

The default is :func:`~lipnet.models.lipconvnet.lipconvnet_m` (the ConvNet of Prach, Brau, Buttazzo &
Lampert, "1-Lipschitz Layers Compared: Memory, Speed, and Certifiable Robustness", CVPR 2024) at batch
256 on 3x32x32 inputs on CUDA, and :func:`~lipnet.models.lipconvnet.lipconvnet_xs` at batch 32 on CPU,
where size M takes seconds per step. Every kind's network is timed in the same process with interleaved
rounds (median over rounds), so machine load hits all of them alike. Reported next to each: the implied
seconds per 50,000-image epoch and the paper's (:data:`PUBLISHED_A100_S_PER_EPOCH`, size M on one A100),
and the eval forward against the same network with plain frozen weights (:func:`lipnet.export`), whose
ratio the layers' eval caches are meant to keep within 1.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipnet.bench import device_label, timed
from lipnet.train import resolve_device

__all__ = ["EPOCH_IMAGES", "PUBLISHED_A100_S_PER_EPOCH", "bench_models", "models_markdown", "run"]

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


def bench_models(
    *,
    model: str = "lipconvnet_m",
    kinds: Sequence[str] | None = None,
    batch: int = 256,
    rounds: int = 5,
    device: str = "cpu",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Median training step and eval forward of ``model`` built with each layer kind (default: all).

    Training step: forward on a ``(batch, 3, 32, 32)`` uniform batch, cross-entropy against random
    labels, backward, Adam step. Eval forward: under ``torch.no_grad`` in eval mode, after one untimed
    eval forward (so eval caches hold the current weights), of the model and of ``lipnet.export(model)``
    (plain ``nn.Conv2d`` / ``nn.Linear`` holding the same weights). Times in ms; ``images_per_s`` and
    ``s_per_epoch`` follow from the training step; ``published_s_per_epoch`` is
    :data:`PUBLISHED_A100_S_PER_EPOCH` for the kind (``None`` when the paper has none).
    """
    from lipnet.export import export
    from lipnet.models import create
    from lipnet.models.kinds import list_layer_kinds

    known = list_layer_kinds()
    chosen = list(dict.fromkeys(kinds)) if kinds else known
    unknown = [k for k in chosen if k not in known]
    if unknown:
        raise ValueError(f"unknown layer kind(s) {', '.join(unknown)}; known kinds: {', '.join(known)}")
    if batch < 1 or rounds < 1:
        raise ValueError(f"batch and rounds must be >= 1, got batch={batch}, rounds={rounds}")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 32, 32, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    nets: list[nn.Module] = []
    for kind in chosen:
        torch.manual_seed(seed)
        nets.append(create(model, conv=kind).to(dev))
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
    plains = [export(net) for net in nets]
    train: list[list[float]] = [[] for _ in nets]
    evals: list[list[float]] = [[] for _ in nets]
    plain_evals: list[list[float]] = [[] for _ in nets]
    for _ in range(rounds):
        for i, net in enumerate(nets):
            net.train()
            train[i].append(timed(steps[i], dev))
            net.eval()
            with torch.no_grad():
                net(x)
                evals[i].append(timed(lambda net=net: net(x), dev))
                plains[i](x)
                plain_evals[i].append(timed(lambda i=i: plains[i](x), dev))
    rows: list[dict[str, Any]] = []
    for i, kind in enumerate(chosen):
        tr = statistics.median(train[i])
        ev, pev = statistics.median(evals[i]), statistics.median(plain_evals[i])
        rows.append(
            {
                "kind": kind,
                "train_ms": 1e3 * tr,
                "images_per_s": batch / tr,
                "s_per_epoch": EPOCH_IMAGES * tr / batch,
                "published_s_per_epoch": PUBLISHED_A100_S_PER_EPOCH.get(kind),
                "eval_ms": 1e3 * ev,
                "plain_eval_ms": 1e3 * pev,
                "eval_vs_plain": ev / pev,
            }
        )
    return rows


def models_markdown(rows: Sequence[dict[str, Any]], header: str) -> str:
    """The rows of :func:`bench_models` as a Markdown table under ``header``."""
    lines = [
        header,
        "",
        "| kind | train step (ms) | images/s | s per 50k epoch | published A100 s/epoch (M) | "
        "eval forward (ms) | exported eval (ms) | eval / exported |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        published = "–" if r["published_s_per_epoch"] is None else f"{r['published_s_per_epoch']:.1f}"
        lines.append(
            f"| {r['kind']} | {r['train_ms']:.1f} | {r['images_per_s']:.1f} | {r['s_per_epoch']:.1f} | "
            f"{published} | {r['eval_ms']:.2f} | {r['plain_eval_ms']:.2f} | {r['eval_vs_plain']:.2f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """CLI entry: ``lipnet bench models [--model M] [--batch B] [--kinds K,..] [--rounds N] [--device D]``.

    Without ``--model`` / ``--batch``: ``lipconvnet_m`` at batch 256 on CUDA, ``lipconvnet_xs`` at batch
    32 on CPU (the header says which). ``--out F`` writes the Markdown table when ``F`` ends in ``.md``,
    else the rows as JSON.
    """
    from lipnet.runs import atomic_write_text

    device = str(resolve_device(args.device or "auto"))
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = torch.device(device).type == "cuda"
    model = args.model or ("lipconvnet_m" if on_cuda else "lipconvnet_xs")
    batch = args.batch or (256 if on_cuda else 32)
    rows = bench_models(model=model, kinds=args.kinds, batch=batch, rounds=args.rounds, device=device)
    defaults = "" if on_cuda or args.model else " (the CPU default; lipconvnet_m at batch 256 on CUDA)"
    published = ", ".join(f"{k} {v:g} s" for k, v in PUBLISHED_A100_S_PER_EPOCH.items())
    header = (
        f"{model}{defaults}, batch {batch}x3x32x32, {device_label(device)}, torch {torch.__version__}; "
        f"medians over {args.rounds} interleaved rounds. Train step: forward + cross-entropy + backward + "
        f"Adam; s per epoch = {EPOCH_IMAGES:,} images at that rate. Published (Prach et al., CVPR 2024, "
        f"LipConvNet-M on one A100, s per 50k-image epoch): {published}. Eval: no_grad, eval mode, warm "
        "caches, against lipnet.export(model) (plain frozen weights); target eval / exported <= 1.1."
    )
    text = models_markdown(rows, header)
    print(text)
    if args.out:
        path = Path(args.out)
        body = json.dumps(
            {"device": device_label(device), "model": model, "batch": batch, "rows": rows}, indent=2
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n" if path.suffix == ".md" else body)
    return 0
