"""``lipnet bench layers``: training-step and eval-forward time against the anchor libraries.

One architecture (:class:`~lipnet.models.small.SmallCNN`: 4 convolutions 3x3 + 2 dense layers,
GroupSort2, scaled L2-norm pooling), built from lipnet's layers, from deel-torchlip's
(``SpectralConv2d``, ``GroupSort2``, ``ScaledL2NormPool2d``, ``SpectralLinear``), from orthogonium's
(``AdaptiveOrthoConv2d``, ``OrthoLinear``, ``MaxMin``) and from plain unconstrained layers, timed
side by side in one process with interleaved rounds so that machine load hits all of them alike.
The reported figure is the median over rounds; ratios are to deel-torchlip and to the plain net.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lipnet.activations import GroupSort
from lipnet.models import create
from lipnet.pooling import ScaledL2NormPool2d

__all__ = ["bench_layers", "run"]


def _plain(width: int) -> nn.Module:
    """The same network with unconstrained ``nn.Conv2d`` / ``nn.Linear`` weights."""
    w = width

    def conv(i: int, o: int) -> nn.Module:
        return nn.Conv2d(i, o, 3, padding=1)

    return nn.Sequential(
        conv(3, w), GroupSort(2), conv(w, w), GroupSort(2), ScaledL2NormPool2d(2),
        conv(w, 2 * w), GroupSort(2), conv(2 * w, 2 * w), GroupSort(2), ScaledL2NormPool2d(2),
        nn.Flatten(), nn.Linear(2 * w * 64, 4 * w), GroupSort(2), nn.Linear(4 * w, 10),
    )


def _deel(width: int) -> nn.Module:
    import deel.torchlip as tl

    w = width
    return tl.Sequential(
        tl.SpectralConv2d(3, w, 3, padding=1), tl.GroupSort2(),
        tl.SpectralConv2d(w, w, 3, padding=1), tl.GroupSort2(), tl.ScaledL2NormPool2d(2),
        tl.SpectralConv2d(w, 2 * w, 3, padding=1), tl.GroupSort2(),
        tl.SpectralConv2d(2 * w, 2 * w, 3, padding=1), tl.GroupSort2(), tl.ScaledL2NormPool2d(2),
        nn.Flatten(), tl.SpectralLinear(2 * w * 64, 4 * w), tl.GroupSort2(), tl.SpectralLinear(4 * w, 10),
    )


def _orthogonium(width: int) -> nn.Module:
    from orthogonium.layers import AdaptiveOrthoConv2d, OrthoLinear

    w = width

    def conv(i: int, o: int) -> nn.Module:
        return AdaptiveOrthoConv2d(i, o, 3, padding=1, padding_mode="zeros")

    return nn.Sequential(
        conv(3, w), GroupSort(2), conv(w, w), GroupSort(2), ScaledL2NormPool2d(2),
        conv(w, 2 * w), GroupSort(2), conv(2 * w, 2 * w), GroupSort(2), ScaledL2NormPool2d(2),
        nn.Flatten(), OrthoLinear(2 * w * 64, 4 * w), GroupSort(2), OrthoLinear(4 * w, 10),
    )


def _builders(width: int) -> dict[str, Callable[[], nn.Module]]:
    return {
        "lipnet bjorck": lambda: create("small_cnn", width=width, conv="bjorck"),
        "lipnet aol": lambda: create("small_cnn", width=width, conv="aol"),
        "deel-torchlip": lambda: _deel(width),
        "orthogonium": lambda: _orthogonium(width),
        "plain": lambda: _plain(width),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_layers(
    *, width: int = 32, batch: int = 64, rounds: int = 10, device: str = "cpu", seed: int = 0
) -> list[dict[str, float | str]]:
    """Median training-step (forward, backward, Adam step) and eval-forward time of each network.

    Networks whose library is not installed are skipped. Times are in milliseconds.
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    x = torch.rand(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    nets: dict[str, nn.Module] = {}
    for name, build in _builders(width).items():
        try:
            nets[name] = build().to(dev)
        except ImportError:
            continue
    opts = {k: torch.optim.Adam(n.parameters(), lr=1e-3) for k, n in nets.items()}

    def train_step(k: str) -> None:
        opts[k].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(nets[k](x), y).backward()
        opts[k].step()

    train: dict[str, list[float]] = {k: [] for k in nets}
    evals: dict[str, list[float]] = {k: [] for k in nets}
    for k in nets:  # warm-up: lazy initialisation, allocator, caches
        nets[k].train()
        train_step(k)
        train_step(k)
    for _ in range(rounds):
        for k, net in nets.items():
            net.train()
            _sync(dev)
            t = time.perf_counter()
            train_step(k)
            _sync(dev)
            train[k].append(time.perf_counter() - t)
            net.eval()
            with torch.no_grad():
                net(x)
                _sync(dev)
                t = time.perf_counter()
                net(x)
                _sync(dev)
                evals[k].append(time.perf_counter() - t)
    rows: list[dict[str, float | str]] = []
    ref_train = statistics.median(train["deel-torchlip"]) if "deel-torchlip" in train else float("nan")
    plain_eval = statistics.median(evals["plain"])
    for k in nets:
        tr, ev = statistics.median(train[k]), statistics.median(evals[k])
        rows.append({
            "network": k,
            "train_ms": 1e3 * tr,
            "eval_ms": 1e3 * ev,
            "train_vs_deel": tr / ref_train,
            "eval_vs_plain": ev / plain_eval,
        })
    return rows


def _markdown(rows: list[dict[str, float | str]], header: str) -> str:
    lines = [
        header,
        "",
        "| network | train step (ms) | eval forward (ms) | train / deel-torchlip | eval / plain |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['train_ms']:.1f} | {r['eval_ms']:.1f} | {r['train_vs_deel']:.2f} | "
            f"{r['eval_vs_plain']:.2f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """CLI entry: ``lipnet bench layers [--device D] [--rounds N] [--width W] [--batch B] [--out F]``."""
    device = getattr(args, "device", "cpu") or "cpu"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    rows = bench_layers(
        width=getattr(args, "width", 32), batch=getattr(args, "batch", 64),
        rounds=getattr(args, "rounds", 10), device=device,
    )
    cpu = f"CPU, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu
    batch = getattr(args, "batch", 64)
    text = _markdown(rows, f"small_cnn, batch {batch}x3x32x32, {name}, torch {torch.__version__}")
    print(text)
    out = getattr(args, "out", None)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"device": name, "rows": rows}, indent=2))
        tmp.replace(path)
    return 0
