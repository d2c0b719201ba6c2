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


def _centering_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (8 samples, channel offsets) and the weights of a linear loss on the output."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64)
    x = x + torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    return x, torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64)


def _centering_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """BatchCentering in training mode on this rank's half of the batch; saves what it computed."""
    from lipnet.layers import BatchCentering

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x_all, w_all = _centering_batch()
        part = slice(rank * 8 // world, (rank + 1) * 8 // world)
        x = x_all[part].clone().requires_grad_(True)
        layer = BatchCentering(3, momentum=0.5).double()
        y = layer(x)
        (w_all[part] * y).sum().backward()
        local = BatchCentering(3, momentum=0.5, sync=False).double()(x_all[part])
        torch.save(
            {
                "y": y.detach(),
                "grad": x.grad,
                "bias_grad": layer.bias.grad,
                "running_mean": layer.running_mean,
                "local": local.detach(),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_batch_centering_synchronises_the_batch_mean(tmp_path: Path) -> None:
    """Under torch.distributed two processes on halves of a batch compute what one process computes on
    the whole batch: the outputs, the input gradients of the summed loss, the bias gradient (summed over
    the processes, as DDP's average scaled by the world size) and the running mean."""
    from lipnet.layers import BatchCentering

    mp.spawn(_centering_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    x_all, w_all = _centering_batch()
    x = x_all.clone().requires_grad_(True)
    layer = BatchCentering(3, momentum=0.5).double()
    y = layer(x)
    (w_all * y).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad)
    torch.testing.assert_close(ranks[0]["bias_grad"] + ranks[1]["bias_grad"], layer.bias.grad)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], layer.running_mean)
    # without synchronisation each process would centre on its own half's mean
    assert not torch.allclose(torch.cat([r["local"] for r in ranks]), y.detach())
