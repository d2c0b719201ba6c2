"""The training step with the settled dense weights in the model's batched Björck call against computed per
layer (how they were computed before they joined it), interleaved in one process.

    OMP_NUM_THREADS=1 python experiments/settled_batch_time.py --kind bcop --rounds 20

The network is the Fashion-MNIST bench's (``fmnist_convnet_s`` at width 16, no blocks, hidden 128; batch 128,
cross-entropy, Adam). "per layer" detaches the settled parametrizations from the batcher, so each computes
its weight with :func:`lipnet.layers.bjorck.bjorck_settled`; the other weights stay batched in both modes.
Prints the median over the rounds of each mode's mean of three steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lipnet.layers.batching import WeightBatcher, batch_weights
from lipnet.models.fmnist import FashionConvNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="bcop")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = batch_weights(FashionConvNet(width=16, blocks=0, hidden=128, conv=args.kind))
    batcher = model.weight_batcher
    assert isinstance(batcher, WeightBatcher)
    settled = [p for _, p in batcher.members if p.settle_iterations]
    if not settled:
        raise SystemExit(f"kind {args.kind!r} has no settled Björck weight")
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    times: dict[str, list[float]] = {"batched": [], "per layer": []}
    for _ in range(args.rounds):
        for mode in times:
            for p in settled:
                # without a batcher a parametrization computes its own weight, and the batcher skips it
                p.batcher = batcher if mode == "batched" else None
            step()
            start = time.perf_counter()
            for _ in range(3):
                step()
            times[mode].append((time.perf_counter() - start) / 3)
    batched, per_layer = (statistics.median(times[mode]) for mode in times)
    print(
        f"{args.kind}: batched {batched * 1e3:.1f} ms, per layer {per_layer * 1e3:.1f} ms, "
        f"ratio {batched / per_layer:.3f}"
    )


if __name__ == "__main__":
    main()
