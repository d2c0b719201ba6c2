"""Data-parallel training: two CPU processes on the gloo backend end with identical weights."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lipnet.training.config import Config, dump_config, load_config
from lipnet.training.runs import RunFolder

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, config_path: str, weights_dir: str) -> None:
    """One torchrun-like process: the environment variables torchrun sets, then ``train``."""
    from safetensors.torch import save_file

    from lipnet.training.run import train

    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    result = train(load_config(config_path), progress=False)
    assert result.finished
    assert (result.results is not None) == (rank == 0)
    state = {k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(Path(weights_dir) / f"rank{rank}.safetensors"))


def test_two_gloo_processes_end_identical(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    # global batch 32 = 2 processes x 16; 64 images -> 2 steps per epoch on each rank
    cfg: Config = tiny_config(tmp_path / "run", "optim.epochs=1")
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(dump_config(cfg), encoding="utf-8")
    weights = tmp_path / "weights"
    weights.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(config_path), str(weights)), nprocs=2, join=True)

    rank0, rank1 = (
        load_file(str(weights / "rank0.safetensors")),
        load_file(str(weights / "rank1.safetensors")),
    )
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    run = RunFolder(cfg.out or "")
    final = run.load_checkpoint("final")
    for key in rank0:
        assert torch.equal(final.model[key], rank0[key]), key
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [2]
    # every image of the epoch counted once: accuracies are multiples of 1/64
    assert (rows[0]["train_acc"] * 64) == pytest.approx(round(rows[0]["train_acc"] * 64))
    assert run.has_results()
