"""CIFAR-10 from the standard ``cifar-10-batches-py`` folder (python pickles), with an optional download."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipnet.data.dataset import ImageDataset
from lipnet.data.errors import DATA_DIR_HINT, DOWNLOAD_HINT, DatasetCorruptError, DatasetNotFoundError
from lipnet.data.fetch import DownloadError, download_file, resolve_data_dir, safe_extract_tar
from lipnet.data.safe_pickle import restricted_load

__all__ = ["CIFAR10_FOLDER", "CIFAR10_MD5", "CIFAR10_URL", "download_cifar10", "load_cifar10"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
_ARCHIVE = "cifar-10-python.tar.gz"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES = ("test_batch",)
_META = "batches.meta"
_PIXELS = 3 * 32 * 32


def _how_to_get(data_dir: Path) -> str:
    return (
        f"Get CIFAR-10 in one of two ways: let lipnet download it ({DOWNLOAD_HINT}), which fetches "
        f"{CIFAR10_URL} (163 MB, md5 {CIFAR10_MD5}) and extracts it; or put the extracted "
        f"'{CIFAR10_FOLDER}' folder in the data folder (now {data_dir.resolve()}; {DATA_DIR_HINT})."
    )


def download_cifar10(data_dir: str | Path | None = None) -> Path:
    """Download (md5-checked) and extract CIFAR-10 under ``data_dir``; return the batches folder.

    An archive already present with the right checksum is reused.

    Raises:
        DownloadError: the archive could not be fetched or its checksum is wrong.
        DatasetCorruptError: the archive cannot be extracted safely.
    """
    root = resolve_data_dir(data_dir)
    archive = download_file([CIFAR10_URL], root / _ARCHIVE, CIFAR10_MD5)
    return safe_extract_tar(archive, root, only=CIFAR10_FOLDER)


def load_cifar10(
    split: str = "train", *, data_dir: str | Path | None = None, download: bool = False, n: int | None = None
) -> ImageDataset:
    """CIFAR-10 as an :class:`ImageDataset` of float32 ``(N, 3, 32, 32)`` images in ``[0, 1]``.

    Reads ``data_dir/cifar-10-batches-py`` (``data_batch_1..5`` for train, ``test_batch`` for test,
    ``batches.meta`` for the class names). ``n`` keeps the first ``n`` samples in file order;
    only the batch files they come from are read (and required). With ``download=True`` a missing
    or incomplete folder is fetched first.

    Raises:
        DatasetNotFoundError: a file is missing (the message says how to get the data).
        DatasetCorruptError: a file is truncated, damaged, or holds anything but the expected arrays.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} for cifar10; use 'train' or 'test'")
    root = resolve_data_dir(data_dir)
    folder = root / CIFAR10_FOLDER
    batches = _TRAIN_FILES if split == "train" else _TEST_FILES
    if download and not all((folder / name).is_file() for name in (*batches, _META)):
        try:
            download_cifar10(root)
        except DownloadError as err:
            raise DatasetNotFoundError(folder, f"{err}\n{_how_to_get(root)}") from err

    classes = _read_meta(_require(folder / _META, root), root)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    count = 0
    for name in batches:
        if n is not None and count >= n:
            break
        data, lab = _read_batch(_require(folder / name, root), root, len(classes))
        images.append(data)
        labels.append(lab)
        count += len(lab)
    if n is not None and count < n:
        raise ValueError(f"n={n} but the cifar10 {split} split has only {count} samples")
    x = np.concatenate(images)[:n].reshape(-1, 3, 32, 32)
    y = np.concatenate(labels)[:n]
    return ImageDataset(
        images=torch.from_numpy(x).to(torch.float32).div_(255.0),
        labels=torch.from_numpy(y),
        num_classes=len(classes),
        classes=classes,
        name="cifar10",
    )


def _require(path: Path, root: Path) -> Path:
    if path.is_file():
        return path
    missing, what = (path, "file") if path.parent.is_dir() else (path.parent, "folder")
    raise DatasetNotFoundError(missing, f"CIFAR-10 {what} not found: {missing}. {_how_to_get(root)}")


def _unpickle(path: Path, root: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return restricted_load(f)
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
    ) as err:
        raise DatasetCorruptError(
            path,
            f"CIFAR-10 file {path} is damaged or not a CIFAR-10 pickle ({err}). "
            f"Replace the folder. {_how_to_get(root)}",
        ) from err


def _corrupt(path: Path, root: Path, problem: str) -> DatasetCorruptError:
    return DatasetCorruptError(
        path, f"CIFAR-10 file {path} is damaged: {problem}. Replace the folder. {_how_to_get(root)}"
    )


def _read_meta(path: Path, root: Path) -> list[str]:
    meta = _unpickle(path, root)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(s, bytes) for s in names):
        raise _corrupt(path, root, "no list of class names under b'label_names'")
    try:
        return [s.decode("utf-8") for s in names]
    except UnicodeDecodeError as err:
        raise _corrupt(path, root, f"class names are not text ({err})") from err


def _read_batch(path: Path, root: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, root)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise _corrupt(path, root, "expected a dict with keys b'data' and b'labels'")
    data, raw_labels = batch[b"data"], batch[b"labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _PIXELS
    ):
        got = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise _corrupt(path, root, f"b'data' must be a uint8 array of shape (N, {_PIXELS}), got {got}")
    if not isinstance(raw_labels, list) or not all(type(v) is int for v in raw_labels):
        raise _corrupt(path, root, "b'labels' must be a list of ints")
    labels = np.asarray(raw_labels, dtype=np.int64)
    if len(labels) != len(data):
        raise _corrupt(path, root, f"{len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(path, root, f"labels outside [0, {num_classes})")
    return data, labels
