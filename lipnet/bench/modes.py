"""How a benchmark runs a network: eagerly, compiled, or compiled with CUDA-graph capture.

* ``eager``: the module itself;
* ``compile``: ``torch.compile(module, backend=backend)`` (inductor by default: fused kernels);
* ``graph``: ``torch.compile(module, backend=backend, mode="reduce-overhead")``: on CUDA the compiled
  forward and backward are captured in CUDA graphs and replayed, one launch for each; elsewhere the same
  as ``compile``.

The training step around the module (loss, backward, optimiser step) stays eager in every mode. Compiled
modules share their parameters with the eager one; bounds and certificates are never taken from them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["BACKENDS", "MODES", "WARMUP", "check_modes", "prepare", "step_begin"]

#: The modes, in the order the tables list them.
MODES = ("eager", "compile", "graph")
#: ``torch.compile`` backends the benchmarks accept: inductor (what a user gets), and aot_eager (capture and
#: autograd tracing without code generation: for checking the compiled path on a machine without a compiler).
BACKENDS = ("inductor", "aot_eager")
#: Untimed calls before timing, per mode: compilation, then the CUDA graphs' warm-up and recording.
WARMUP = {"eager": 2, "compile": 3, "graph": 4}


def check_modes(modes: Sequence[str], backend: str) -> list[str]:
    """``modes`` without repeats, in the given order; ``ValueError`` naming an unknown mode or backend."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; known modes: {', '.join(MODES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    if not modes:
        raise ValueError("give at least one mode")
    return list(dict.fromkeys(modes))


def prepare(module: nn.Module, mode: str, backend: str = "inductor") -> Callable[..., Any]:
    """What a benchmark calls for ``module`` in ``mode`` (module docstring)."""
    if mode == "eager":
        return module
    if mode == "compile":
        return torch.compile(module, backend=backend)
    if mode == "graph":
        return torch.compile(module, backend=backend, mode="reduce-overhead")
    raise ValueError(f"unknown mode {mode!r}; known modes: {', '.join(MODES)}")


def step_begin(mode: str) -> None:
    """Mark a new training step for the CUDA graphs of ``graph`` mode (their outputs of the previous step
    may be overwritten); nothing in the other modes."""
    if mode == "graph":
        torch.compiler.cudagraph_mark_step_begin()
