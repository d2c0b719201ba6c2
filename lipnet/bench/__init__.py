"""The benchmarks behind ``lipnet bench``: one layer per kind and small networks
(:mod:`~lipnet.bench.layers`), model families (:mod:`~lipnet.bench.models`), Fashion-MNIST training
and certification (:mod:`~lipnet.bench.fmnist`), each against the one table of anchor implementations
(:mod:`~lipnet.bench.anchors`).

Here: the clock every benchmark times with (:func:`timed`), the device label of their headers and the
Markdown table and cell formatter of their outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["cell", "device_label", "markdown_table", "sync", "timed"]


def sync(device: torch.device) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing on other devices)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``, synchronising CUDA before and after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def device_label(device: str) -> str:
    """The GPU's name on CUDA, else ``CPU, N threads``."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} threads"


def markdown_table(header: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """``header``, a blank line, then the Markdown table of ``columns`` and the formatted cells ``rows``."""
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def cell(value: float | None, fmt: str, missing: str = "–") -> str:
    """``value`` formatted with ``fmt``, or ``missing`` for ``None``."""
    return missing if value is None else format(value, fmt)
