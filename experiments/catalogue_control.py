"""Control for the catalogue's classification rows (docs/catalogue.md): the plain baseline with feedback
gating's two 3x3 convolutions (MaxMin, ``width`` channels) between its blocks and no gate, trained and
evaluated exactly as ``lipnet catalogue`` trains and evaluates a row of the classification task (its data,
seed 0, ``FULL`` budget, certificate and PGD-20 on 100 test samples). Prints one JSON line.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python experiments/catalogue_control.py`` (about 1.5 minutes of CPU).
"""

from __future__ import annotations

import json

import torch
from torch import nn

from lipnet.activations import MaxMin
from lipnet.catalogue import DEFAULT_EPS, FULL, TASKS
from lipnet.catalogue.networks import image_network
from lipnet.catalogue.runner import train_method
from lipnet.layers import BjorckConv2d


def main() -> None:
    torch.set_num_threads(1)
    task, settings, seed = TASKS["classification"], FULL["classification"], 0
    train = task.load("train", settings.n_train, seed, settings.difficulty)
    test = task.load("test", settings.n_test, seed, settings.difficulty)
    torch.manual_seed(seed)
    w = settings.width
    middle = nn.Sequential(
        BjorckConv2d(w, w, 3, padding=1), MaxMin(), BjorckConv2d(w, w, 3, padding=1), MaxMin()
    )
    model = image_network(train.dataset.num_classes, w, middle=middle)
    seconds, state = train_method(task, "baseline", model, train, settings, seed)
    attack = {"name": "pgd", "n": 100, "steps": 20}
    ev = task.evaluate("baseline", model, test, DEFAULT_EPS, attack, state)
    print(
        json.dumps(
            {
                "control": "two ungated 3x3 convolutions (MaxMin) between the blocks",
                "clean": ev.clean_accuracy,
                "certified": ev.certified,
                "pgd": ev.robust_accuracy,
                "lipschitz": ev.lipschitz,
                "params": sum(p.numel() for p in model.parameters()),
                "train_seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
