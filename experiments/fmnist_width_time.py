"""How wide can lipnet's default Fashion-MNIST network be at an anchor's cost per step?

Times, in one process and interleaved (:func:`lipnet.bench.fmnist.time_steps`), the training step of
lipnet's network of the bench recipe (``--config``; with ``model.conv: auto`` the kind and activation at
``--tau``, as ``lipnet:auto`` picks them) at each of ``--widths``, and of the anchors' networks
(deel-torchlip, orthogonium AOC) at the recipe's own layout. The ratios to lipnet at the recipe's width
say which wider lipnet network costs no more per epoch than an anchor's; ``lipnet bench fmnist --set
model.width=W --models lipnet:auto`` then trains it (docs/benchmarks.md, "Householder activations at τ =
5", its last paragraph: width 24 costs AOC's step and is no better than width 16 at 20 epochs).

Run (a few minutes on one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python experiments/fmnist_width_time.py --widths 16,24 --tau 0.5 \\
        --rounds 8 --out experiments/results/fmnist_bench/epochs20_width24/timing_tau0.5
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from certify.io import atomic_write_json, atomic_write_text
from lipnet import data
from lipnet.bench.fmnist import Contender, contenders, layout_of, time_steps, timing_markdown
from lipnet.cli.argtypes import positive_float
from lipnet.models import create
from lipnet.training.config import apply_overrides, load_config

#: The anchors timed beside lipnet (their contenders' kinds in :func:`lipnet.bench.fmnist.contenders`).
ANCHOR_NAMES = ("spectral", "aoc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/configs/fmnist_convnet_s.yaml")
    parser.add_argument("--widths", type=lambda text: [int(w) for w in text.split(",")], required=True)
    parser.add_argument("--tau", type=positive_float, default=5.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = apply_overrides(load_config(args.config), [f"loss.tau={args.tau!r}"])
    size, layout, _options = layout_of(recipe)
    # the network lipnet trains at --tau (conv: auto resolved as a training run resolves it)
    spec = recipe.model.for_loss(recipe.loss)
    kind = spec.label()
    width = layout["width"]
    chosen = [
        Contender(
            "lipnet",
            f"{kind}-width{w}",
            lambda w=w: create(spec.name, **{**spec.kwargs, "width": w, "num_classes": 10}),
        )
        for w in args.widths
    ]
    chosen += [
        Contender(c.library, f"{c.kind}-width{width}", c.build)
        for c in contenders(size, layout=layout)
        if c.library != "lipnet" and c.kind in ANCHOR_NAMES
    ]
    train_ds = data.load("fashion_mnist", "train", n=args.n_train)
    steps_per_epoch = -(-60_000 // recipe.optim.batch_size)
    rows = time_steps(
        chosen, recipe, train_ds, torch.device("cpu"), rounds=args.rounds, steps_per_epoch=steps_per_epoch
    )
    header = (
        f"Training step at tau {args.tau:g} ({args.config}), lipnet's {kind} network at widths "
        f"{', '.join(map(str, args.widths))} and the anchors at width {width}, one process, "
        f"{args.rounds} interleaved rounds, {torch.get_num_threads()} thread(s); "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}; s/epoch for 60,000 images"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "timing.json", {"header": header, "rows": rows})
    atomic_write_text(out / "timing.md", timing_markdown(rows, header))
    print(json.dumps([{k: r[k] for k in ("name", "ms_per_step", "ratio")} for r in rows], indent=1))


if __name__ == "__main__":
    main()
