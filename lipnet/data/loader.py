"""Batches straight from device memory: reproducible shuffling, optional augmentation, DDP sharding."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from lipnet.data.augment import Augment
from lipnet.data.dataset import ImageDataset

__all__ = ["DeviceLoader"]

_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


def _derive_seed(*entropy: int) -> int:
    """A 64-bit seed that depends on every value of ``entropy`` (no collisions between nearby tuples)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0])


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class DeviceLoader:
    """Iterate over ``(x, y)`` batches of an :class:`ImageDataset`, already on ``device``.

    With ``targets`` (further per-sample tensors: multi-hot attributes, masks, instance labels, sample
    indices, ...) each batch is ``(x, y, *targets)``, every tensor indexed by the same samples.

    The dataset's tensors are moved to ``device`` once, at construction; each batch is then an index
    into them, so no worker processes or host-to-device copies are involved.

    Reproducibility: the visiting order of an epoch is a function of ``(seed, epoch)`` only, and the
    augmentation of ``(seed, epoch, rank)`` only. Call :meth:`set_epoch` at the start of each epoch (as
    with ``DistributedSampler``); a run resumed at epoch ``e`` then sees exactly the batches an
    uninterrupted run would, and iterating twice over the same epoch gives the same batches.

    Sharding: with ``world_size > 1`` the epoch's order is padded by repeating it from the start up
    to a multiple of ``world_size``, and rank ``r`` takes every ``world_size``-th index starting at
    ``r``. Shards are disjoint in positions, equal in size (:attr:`num_samples`, padding included),
    and together cover the whole dataset.

    Args:
        dataset: the samples.
        batch_size: samples per batch (per rank).
        shuffle: visit samples in a random order that changes with the epoch.
        augment: applied to each batch on the device, with a generator seeded from
            ``(seed, epoch, rank)``.
        device: where batches are produced.
        seed: base seed of the order and the augmentation.
        drop_last: drop this rank's last batch when it is smaller than ``batch_size``.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of processes sharing the dataset.
        targets: extra tensors whose first dimension is ``len(dataset)``, batched alongside the labels
            (never augmented).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: Augment | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        targets: Sequence[Tensor] = (),
    ) -> None:
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"DeviceLoader needs an ImageDataset, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError(f"dataset {dataset.name!r} is empty")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.seed = _check_int("seed", seed, 0)
        self.dataset = dataset
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        for k, t in enumerate(targets):
            if not isinstance(t, Tensor) or t.ndim < 1 or t.shape[0] != len(dataset):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"targets[{k}] must be a tensor with first dimension {len(dataset)}, got {got}"
                )
        self.targets = tuple(t.to(self.device) for t in targets)
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) / world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = _check_int("epoch", epoch, 0)

    def indices(self) -> Tensor:
        """Dataset indices this rank visits in the current epoch, in order (int64, on the CPU)."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch, _ORDER_STREAM))
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        return order[self.rank : total : self.world_size]

    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        order = self.indices().to(self.device)
        generator = None
        if self.augment is not None:
            seed = _derive_seed(self.seed, self.epoch, _AUGMENT_STREAM, self.rank)
            generator = torch.Generator().manual_seed(seed)
        for i in range(len(self)):
            batch = order[i * self.batch_size : (i + 1) * self.batch_size]
            x, y = self.images[batch], self.labels[batch]
            if self.augment is not None:
                x = self.augment(x, generator)
            yield (x, y, *(t[batch] for t in self.targets))
