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
from torch import nn

from certify.io import atomic_write_json, atomic_write_text
from lipnet import data
from lipnet.bench.anchors import ANCHORS
from lipnet.bench.fmnist import Contender, layout_of, time_steps, timing_markdown
from lipnet.cli.argtypes import positive_float
from lipnet.layers.kinds import AUTO, kind_for_tau
from lipnet.models import create
from lipnet.models.fmnist import SIZES, activation_for_tau, fmnist_layers
from lipnet.training.config import apply_overrides, load_config

#: The anchors timed beside lipnet (names of :data:`lipnet.bench.anchors.ANCHORS`' networks).
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
    size, layout, options = layout_of(recipe)
    conv = recipe.model.kwargs.get("conv", AUTO)
    kind = kind_for_tau(args.tau) if conv == AUTO else conv
    if conv == AUTO and "activation" not in options:
        options["activation"] = activation_for_tau(args.tau)
    arch = {**SIZES[size], **layout, "num_classes": 10}
    chosen = [
        Contender(
            "lipnet",
            f"{kind}+{options.get('activation', 'groupsort')}-width{w}",
            lambda w=w: create(f"fmnist_convnet_{size}", conv=kind, **{**arch, "width": w}, **options),
        )
        for w in args.widths
    ]
    for anchor in ANCHORS.values():
        if anchor.name in ANCHOR_NAMES:
            layers = anchor.layers(as_lipnet=False)
            chosen.append(
                Contender(
                    anchor.library,
                    f"{anchor.name}-width{arch['width']}",
                    lambda layers=layers, anchor=anchor: nn.Sequential(
                        *fmnist_layers(
                            layers, activation=lambda _: anchor.activation(), pool=anchor.pool, **arch
                        )
                    ),
                )
            )
    train_ds = data.load("fashion_mnist", "train", n=args.n_train)
    steps_per_epoch = -(-60_000 // recipe.optim.batch_size)
    rows = time_steps(
        chosen, recipe, train_ds, torch.device("cpu"), rounds=args.rounds, steps_per_epoch=steps_per_epoch
    )
    header = (
        f"Training step at tau {args.tau:g} ({args.config}), lipnet's {kind} network at widths "
        f"{', '.join(map(str, args.widths))} and the anchors at width {arch['width']}, one process, "
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
