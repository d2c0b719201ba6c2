"""Where training runs: the device a request names, and the torchrun (DDP) environment of this process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed

from lipnet.training.config import ConfigError

__all__ = ["Distributed", "resolve_device"]


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the process's CUDA device when CUDA is available, else CPU; others as named.

    ``cuda`` without an index is the process's own device (``local_rank``). A device that is not there
    (no CUDA, an index past the device count, no MPS) raises :class:`ConfigError`.
    """
    if request == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(request)
    except RuntimeError:
        raise ConfigError(f"unknown device {request!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {request!r} asked for, but CUDA is not available here (use device=auto)"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {request!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for, but MPS is not available here")
    return device


@dataclass
class Distributed:
    """The torchrun environment of this process (rank 0 of 1 without torchrun).

    :meth:`from_env` reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :meth:`start` joins the process
    group (NCCL on CUDA, gloo otherwise) unless one is already initialised, and :meth:`close` leaves
    the group it started. With one process every collective is the identity.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that evaluates, logs and writes files."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))

    def start(self, device: torch.device) -> None:
        if self.world_size > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """``values`` summed over the processes (float64, all-reduce)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()
            self.owns_group = False
