"""``lipnet catalogue``: every attention method trained and certified on its task, under one budget.

Each task (:mod:`lipnet.catalogue.tasks`, built from ``shapes10`` by :mod:`lipnet.catalogue.data`) trains
a plain 1-Lipschitz baseline and every :mod:`lipnet.attention` method that belongs to it, with the same
data, seed and budget (:data:`~lipnet.catalogue.runner.FULL`), the loss of the method's paper on
tau-scaled logits, and certifies each network with a sound bound of the whole network
(:func:`certify.certify`, or the task's documented per-task / per-attribute / per-pixel rule), through
the one fit loop (:func:`lipnet.training.loop.fit`). The networks are in
:mod:`lipnet.catalogue.networks`, the task metrics in :mod:`lipnet.catalogue.metrics`, the outputs
(``catalogue.csv``, ``catalogue.md``, ``catalogue.png``, resumable) in :mod:`lipnet.catalogue.report`;
the command is :mod:`lipnet.cli.catalogue`.
"""

from lipnet.catalogue.report import CatalogueRow, read_rows, write_outputs
from lipnet.catalogue.runner import (
    DEFAULT_EPS,
    FULL,
    QUICK,
    available_methods,
    order,
    raw_bound,
    run_catalogue,
    settings_key,
    train_method,
)
from lipnet.catalogue.tasks import BASELINE, TASKS, TaskSettings

__all__ = [
    "BASELINE",
    "DEFAULT_EPS",
    "FULL",
    "QUICK",
    "TASKS",
    "CatalogueRow",
    "TaskSettings",
    "available_methods",
    "order",
    "raw_bound",
    "read_rows",
    "run_catalogue",
    "settings_key",
    "train_method",
    "write_outputs",
]
