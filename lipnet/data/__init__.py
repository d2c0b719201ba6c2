"""Datasets as in-memory tensors, a device-side batch loader, and augmentation in plain torch.

``load(name, split)`` returns an :class:`ImageDataset` for ``"shapes10"`` (procedural, offline, the
default), ``"cifar10"``, ``"fashion_mnist"`` and ``"mnist"``; :class:`DeviceLoader` iterates over it in
reproducible, shardable batches already on the training device, optionally through :class:`Augment`.
"""

from __future__ import annotations

from lipnet.data.augment import Augment
from lipnet.data.dataset import ImageDataset
from lipnet.data.errors import DatasetCorruptError, DatasetNotFoundError
from lipnet.data.fetch import default_data_dir
from lipnet.data.loader import DeviceLoader
from lipnet.data.registry import FLIP_INVARIANT, flip_invariant, has_difficulty, list_datasets, load

__all__ = [
    "FLIP_INVARIANT",
    "Augment",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "DeviceLoader",
    "ImageDataset",
    "default_data_dir",
    "flip_invariant",
    "has_difficulty",
    "list_datasets",
    "load",
]
