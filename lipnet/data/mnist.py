"""MNIST and Fashion-MNIST from the four standard IDX files (gzipped or not), with an optional download."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lipnet.data.dataset import ImageDataset
from lipnet.data.errors import DATA_DIR_HINT, DOWNLOAD_HINT, DatasetCorruptError, DatasetNotFoundError
from lipnet.data.fetch import DownloadError, download_file, resolve_data_dir
from lipnet.data.idx import read_idx

__all__ = ["FASHION_MNIST", "MNIST", "IdxSource", "load_idx_dataset"]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxSource:
    """Where an IDX dataset comes from.

    Attributes:
        name: registry name (``"mnist"``).
        title: human-readable name for messages.
        folder: sub-folder of the data folder holding the files (also where downloads go).
        mirrors: base URLs tried in order; a file's URL is the base followed by ``<file>.gz``.
        md5: MD5 of each official ``.gz`` file, keyed by its name.
        classes: class names in label order.
        system_dirs: read-only folders searched after the data folder (distribution packages).
        system_hint: how to install those folders, for error messages ("" when there are none).
    """

    name: str
    title: str
    folder: str
    mirrors: tuple[str, ...]
    md5: dict[str, str]
    classes: tuple[str, ...]
    system_dirs: tuple[Path, ...] = ()
    system_hint: str = ""


FASHION_MNIST = IdxSource(
    name="fashion_mnist",
    title="Fashion-MNIST",
    folder="fashion-mnist",
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    md5={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    system_hint="install the Debian package (apt-get install dataset-fashion-mnist, which puts the files in "
    "/usr/share/datasets/fashion-mnist)",
)

MNIST = IdxSource(
    name="mnist",
    title="MNIST",
    folder="mnist",
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    md5={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    classes=tuple(str(d) for d in range(10)),
)


def _how_to_get(source: IdxSource, root: Path) -> str:
    ways = [source.system_hint] if source.system_hint else []
    ways.append(
        f"let lipnet download them ({DOWNLOAD_HINT}), which fetches the official files from "
        f"{source.mirrors[0]} and checks their md5"
    )
    ways.append(
        f"put the four IDX files ({', '.join(_FILES['train'] + _FILES['test'])}, each optionally "
        f"gzipped as .gz) in {(root / source.folder).resolve()} (the data folder: {DATA_DIR_HINT})"
    )
    count = "two" if len(ways) == 2 else "three"
    return f"Get {source.title} in one of {count} ways: " + "; or ".join(ways) + "."


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate(source: IdxSource, split: str, root: Path, download: bool) -> tuple[Path, Path]:
    """The (images, labels) files of ``split``: from the first folder holding any of them, else downloaded."""
    stems = _FILES[split]
    for folder in (root / source.folder, *source.system_dirs):
        images, labels = (_find(folder, stem) for stem in stems)
        if images is not None and labels is not None:
            return images, labels
        if images is not None or labels is not None:
            stem = stems[1] if images is not None else stems[0]
            raise DatasetNotFoundError(
                folder / stem,
                f"{source.title} file not found: {folder / stem} (nor {stem}.gz), although {folder} holds "
                f"the other file of the {split} split. {_how_to_get(source, root)}",
            )
    if not download:
        searched = ", ".join(str(p) for p in (root / source.folder, *source.system_dirs))
        raise DatasetNotFoundError(
            root / source.folder / stems[0],
            f"{source.title} {split} files not found (searched {searched}). {_how_to_get(source, root)}",
        )
    paths = []
    for stem in stems:
        name = f"{stem}.gz"
        try:
            paths.append(
                download_file(
                    [m + name for m in source.mirrors], root / source.folder / name, source.md5[name]
                )
            )
        except DownloadError as err:
            raise DatasetNotFoundError(
                root / source.folder / name, f"{err}\n{_how_to_get(source, root)}"
            ) from err
    return paths[0], paths[1]


def load_idx_dataset(
    source: IdxSource,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    n: int | None = None,
) -> ImageDataset:
    """Load one split of an IDX dataset as float32 ``(N, 1, 28, 28)`` images in ``[0, 1]``.

    Files are looked up in ``data_dir/<source.folder>`` (plain before ``.gz``), then in the source's
    system folders (Debian's ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST), and downloaded
    into the former when ``download`` is true and none was found. ``n`` keeps the first ``n`` samples.

    Raises:
        DatasetNotFoundError: a file is missing (the message lists the ways to get it).
        DatasetCorruptError: a file is truncated, damaged, or has unexpected dimensions or labels.
    """
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r} for {source.name}; use 'train' or 'test'")
    root = resolve_data_dir(data_dir)
    image_path, label_path = _locate(source, split, root, download)
    hint = _how_to_get(source, root)
    try:
        images = read_idx(image_path)
        labels = read_idx(label_path)
    except DatasetCorruptError as err:
        raise DatasetCorruptError(err.path, f"{err} Replace the file. {hint}") from err
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetCorruptError(
            image_path,
            f"{image_path}: expected uint8 images of shape (N, 28, 28), got "
            f"{images.dtype} {images.shape}. Replace the file. {hint}",
        )
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DatasetCorruptError(
            label_path,
            f"{label_path}: expected {len(images)} uint8 labels (one per image "
            f"in {image_path.name}), got {labels.dtype} {labels.shape}. Replace the file. "
            f"{hint}",
        )
    if len(labels) and int(labels.max()) >= len(source.classes):
        raise DatasetCorruptError(
            label_path,
            f"{label_path}: label {int(labels.max())} outside "
            f"[0, {len(source.classes)}). Replace the file. {hint}",
        )
    if n is not None and n > len(labels):
        raise ValueError(f"n={n} but the {source.name} {split} split has only {len(labels)} samples")
    return ImageDataset(
        images=torch.from_numpy(images[:n].copy()).to(torch.float32).div_(255.0).unsqueeze(1),
        labels=torch.from_numpy(labels[:n].astype(np.int64)),
        num_classes=len(source.classes),
        classes=list(source.classes),
        name=source.name,
    )
