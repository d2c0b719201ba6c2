"""One entry point for every dataset: ``lipnet.data.load(name, split, ...)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lipnet.data.cifar import load_cifar10
from lipnet.data.dataset import ImageDataset
from lipnet.data.mnist import FASHION_MNIST, MNIST, load_idx_dataset
from lipnet.data.shapes import load_shapes10

__all__ = ["FLIP_INVARIANT", "flip_invariant", "has_difficulty", "list_datasets", "load"]

_Dir = str | Path | None


def _shapes10(split: str, data_dir: _Dir, download: bool, n: int | None, seed: int) -> ImageDataset:
    return load_shapes10(split, data_dir=data_dir, n=n, seed=seed)  # generated locally: nothing to download


def _shapes10_at(split: str, data_dir: _Dir, n: int | None, seed: int, difficulty: float) -> ImageDataset:
    return load_shapes10(split, data_dir=data_dir, n=n, seed=seed, difficulty=difficulty)


#: The datasets that take a ``difficulty`` setting (the procedural ones), each with its loader given one.
_DIFFICULTY_LOADERS: dict[str, Callable[[str, _Dir, int | None, int, float], ImageDataset]] = {
    "shapes10": _shapes10_at,
}


def _cifar10(split: str, data_dir: _Dir, download: bool, n: int | None, seed: int) -> ImageDataset:
    return load_cifar10(split, data_dir=data_dir, download=download, n=n)


def _fashion_mnist(split: str, data_dir: _Dir, download: bool, n: int | None, seed: int) -> ImageDataset:
    return load_idx_dataset(FASHION_MNIST, split, data_dir=data_dir, download=download, n=n)


def _mnist(split: str, data_dir: _Dir, download: bool, n: int | None, seed: int) -> ImageDataset:
    return load_idx_dataset(MNIST, split, data_dir=data_dir, download=download, n=n)


_LOADERS: dict[str, Callable[[str, _Dir, bool, int | None, int], ImageDataset]] = {
    "shapes10": _shapes10,
    "cifar10": _cifar10,
    "fashion_mnist": _fashion_mnist,
    "mnist": _mnist,
}


#: Whether a horizontally mirrored image of each dataset shows the same class and looks like the data, so
#: that random flips suit it as augmentation: CIFAR-10's objects and animals and shapes10's shapes (each
#: class is mirror-symmetric or drawn at random rotations) yes; digits no (a mirrored 2, 3, 4, 7 or 9 is no
#: digit), nor Fashion-MNIST, where every shoe, sandal and ankle boot faces the same way.
FLIP_INVARIANT: dict[str, bool] = {"shapes10": True, "cifar10": True, "fashion_mnist": False, "mnist": False}


def flip_invariant(name: str) -> bool:
    """:data:`FLIP_INVARIANT` of dataset ``name`` (``-`` accepted for ``_``, case ignored); ``ValueError``
    for a dataset :func:`load` does not know."""
    key = name.lower().replace("-", "_")
    if key not in FLIP_INVARIANT:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return FLIP_INVARIANT[key]


def has_difficulty(name: str) -> bool:
    """Whether dataset ``name`` takes :func:`load`'s ``difficulty`` setting (``shapes10``); ``ValueError``
    for a dataset :func:`load` does not know."""
    key = name.lower().replace("-", "_")
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return key in _DIFFICULTY_LOADERS


def list_datasets() -> list[str]:
    """Names accepted by :func:`load`, sorted."""
    return sorted(_LOADERS)


def load(
    name: str,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    n: int | None = None,
    seed: int = 0,
    difficulty: float | None = None,
) -> ImageDataset:
    """Load a dataset split as an :class:`ImageDataset` (float32 images in ``[0, 1]``, int64 labels).

    Args:
        name: one of :func:`list_datasets` (``-`` is accepted for ``_``, case is ignored).
        split: ``"train"`` or ``"test"``.
        data_dir: the data folder; ``None`` means ``$LIPNET_DATA``, else ``./data``.
        download: fetch a missing real dataset from its official source (checksum-verified).
            ``shapes10`` is generated locally and needs no download.
        n: keep only this many samples. For real datasets these are the first ``n`` in file order;
            for ``shapes10`` the first ``n`` generated, which do not depend on the total size.
        seed: generator seed of ``shapes10`` (a different seed is a different dataset); real
            datasets do not depend on it.
        difficulty: ``shapes10``'s difficulty setting in ``[0, 1]`` (the upper end of its per-image
            difficulty; see :mod:`lipnet.data.shapes`); ``None`` is the dataset's default (1, the full
            range). Real datasets have none and refuse a value.

    Raises:
        ValueError: unknown name or split, or ``n`` not a positive integer or larger than the split.
        DatasetNotFoundError: a real dataset's files are missing (the message says how to get them).
        DatasetCorruptError: a real dataset's files are damaged.
    """
    key = name.lower().replace("-", "_")
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if difficulty is not None:
        if key not in _DIFFICULTY_LOADERS:
            have = ", ".join(_DIFFICULTY_LOADERS)
            raise ValueError(f"dataset {name!r} has no difficulty setting (only {have} has one)")
        return _DIFFICULTY_LOADERS[key](split, data_dir, n, seed, difficulty)
    return _LOADERS[key](split, data_dir, download, n, seed)
