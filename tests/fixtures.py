"""Writers of small dataset fixtures in the real on-disk formats (nothing binary is committed).

The encoders here are written independently of ``lipnet.data``'s readers (``struct`` for IDX,
``pickle`` for CIFAR-10), so a reader bug cannot be mirrored by the fixture that tests it.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CifarFixture",
    "IdxFixture",
    "MaliciousPickle",
    "idx_bytes",
    "make_cifar10_archive",
    "write_cifar10",
    "write_idx",
    "write_idx_dataset",
]

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


@dataclass
class CifarFixture:
    """What :func:`write_cifar10` wrote: the folder and the raw rows / labels of each split."""

    folder: Path
    train_data: np.ndarray
    train_labels: np.ndarray
    test_data: np.ndarray
    test_labels: np.ndarray


@dataclass
class IdxFixture:
    """What :func:`write_idx_dataset` wrote: the folder and the arrays of each split."""

    folder: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


class MaliciousPickle:
    """Unpickling an instance runs ``os.system(command)`` (with the standard unpickler)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def _pickle_batch(path: Path, data: np.ndarray, labels: np.ndarray, name: str) -> None:
    batch = {
        b"batch_label": name.encode(),
        b"labels": [int(v) for v in labels],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    # Protocol 2, as the official files (written by Python 2's cPickle) use.
    path.write_bytes(pickle.dumps(batch, protocol=2))


def write_cifar10(root: Path, per_batch: int = 4, seed: int = 0) -> CifarFixture:
    """Write ``root/cifar-10-batches-py``: 5 train batches and 1 test batch of ``per_batch`` images each."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_data = rng.integers(0, 256, (5 * per_batch, 3072), dtype=np.uint8)
    train_labels = rng.integers(0, 10, 5 * per_batch)
    test_data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, per_batch)
    for i in range(5):
        rows = slice(i * per_batch, (i + 1) * per_batch)
        _pickle_batch(
            folder / f"data_batch_{i + 1}", train_data[rows], train_labels[rows], f"training batch {i + 1}"
        )
    _pickle_batch(folder / "test_batch", test_data, test_labels, "testing batch 1")
    meta = {
        b"label_names": [c.encode() for c in CIFAR_CLASSES],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return CifarFixture(folder, train_data, train_labels, test_data, test_labels)


def make_cifar10_archive(root: Path, per_batch: int = 4) -> tuple[Path, CifarFixture]:
    """A ``cifar-10-python.tar.gz`` (in ``root/archive-src``) laid out like the official archive."""
    src = root / "archive-src"
    fixture = write_cifar10(src, per_batch)
    archive = src / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fixture.folder, arcname="cifar-10-batches-py")
    return archive, fixture


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array`` (big-endian header and data)."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = struct.pack(">BBBB", 0, 0, _IDX_CODES[dtype], array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(dtype).tobytes(order="C")


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    """Write ``array`` as an IDX file at ``path`` (``path.gz``, gzip-compressed, when ``gz``)."""
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as f:
            f.write(data)
        data = buffer.getvalue()
    path.write_bytes(data)
    return path


def write_idx_dataset(
    folder: Path, n_train: int = 20, n_test: int = 10, *, gz: bool, seed: int = 0
) -> IdxFixture:
    """Write the four MNIST-style IDX files (random 28x28 uint8 images, labels 0..9) into ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return IdxFixture(folder, *arrays.values())
