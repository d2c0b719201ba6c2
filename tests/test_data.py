"""lipnet.data: real-format readers on fixtures, safe loading, errors, shapes10, DeviceLoader, Augment."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import (
    MaliciousPickle,
    idx_bytes,
    make_cifar10_archive,
    write_cifar10,
    write_idx,
    write_idx_dataset,
)

from lipnet import data
from lipnet.data import (
    Augment,
    DatasetCorruptError,
    DatasetNotFoundError,
    DeviceLoader,
    ImageDataset,
    default_data_dir,
    list_datasets,
    load,
)
from lipnet.data import cifar as cifar_module
from lipnet.data import shapes as shapes_module
from lipnet.data.fetch import DownloadError, atomic_path, download_file, safe_extract_tar
from lipnet.data.idx import parse_idx, read_idx
from lipnet.data.mnist import FASHION_MNIST, MNIST, load_idx_dataset
from lipnet.data.safe_pickle import UnsafePickleError, restricted_load

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_list_datasets_and_exports() -> None:
    assert list_datasets() == ["cifar10", "fashion_mnist", "mnist", "shapes10"]
    for name in data.__all__:
        assert hasattr(data, name)


def test_load_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*cifar10"):
        load("imagenet", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load("shapes10", "val", data_dir=tmp_path)
    for bad_n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            load("shapes10", n=bad_n, data_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        load("shapes10", n=10, seed=-1, data_dir=tmp_path)


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIPNET_DATA", str(tmp_path / "somewhere"))
    assert default_data_dir() == tmp_path / "somewhere"
    monkeypatch.delenv("LIPNET_DATA")
    assert default_data_dir() == Path("data")


# ---------------------------------------------------------------------------------------------- CIFAR-10


def test_cifar10_reads_the_standard_folder(tmp_path: Path) -> None:
    fx = write_cifar10(tmp_path, per_batch=4)
    train = load("cifar10", "train", data_dir=tmp_path)
    test = load("cifar10", "test", data_dir=tmp_path)
    assert len(train) == 20 and len(test) == 4
    assert train.input_shape == (3, 32, 32) and train.images.dtype == torch.float32
    assert train.classes[0] == "airplane" and train.num_classes == 10 and train.name == "cifar10"
    assert torch.equal(train.labels, torch.from_numpy(fx.train_labels))
    assert torch.equal(test.labels, torch.from_numpy(fx.test_labels))
    # Each row is 1024 red values, then 1024 green, then 1024 blue, each plane row-major.
    pixels = (train.images * 255).round().to(torch.int64)
    raw = torch.from_numpy(fx.train_data.astype(np.int64))
    assert torch.equal(pixels[:, 0, 0, 1], raw[:, 1])
    assert torch.equal(pixels[:, 1, 0, 0], raw[:, 1024])
    assert torch.equal(pixels[:, 2, 1, 0], raw[:, 2048 + 32])
    assert torch.equal(pixels[:, 2, 31, 31], raw[:, 3071])


def test_cifar10_n_reads_only_the_batches_it_needs(tmp_path: Path) -> None:
    fx = write_cifar10(tmp_path, per_batch=4)
    for i in (3, 4, 5):
        (fx.folder / f"data_batch_{i}").unlink()
    ds = load("cifar10", "train", data_dir=tmp_path, n=6)
    assert len(ds) == 6 and torch.equal(ds.labels, torch.from_numpy(fx.train_labels[:6]))
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load("cifar10", "train", data_dir=tmp_path, n=9)
    with pytest.raises(ValueError, match="only 4 samples"):
        load("cifar10", "test", data_dir=tmp_path, n=5)


def test_cifar10_missing_folder_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    # the way the commands spell a download (no command has a --download flag)
    assert "--set data.download=true" in message and "--download" not in message
    assert "--data-dir" in message and "data.data_dir" in message and cifar_module.CIFAR10_URL in message
    assert isinstance(info.value, FileNotFoundError)


def test_cifar10_missing_file_is_named(tmp_path: Path) -> None:
    fx = write_cifar10(tmp_path)
    (fx.folder / "data_batch_2").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_2.*--set data\.download=true"):
        load("cifar10", data_dir=tmp_path)
    (fx.folder / "batches.meta").unlink()
    with pytest.raises(DatasetNotFoundError, match="batches.meta"):
        load("cifar10", "test", data_dir=tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_cifar10_damaged_file_is_named(tmp_path: Path, damage: str) -> None:
    fx = write_cifar10(tmp_path)
    path = fx.folder / "data_batch_4"
    raw = path.read_bytes()
    path.write_bytes(
        {"truncate": raw[: len(raw) // 2], "garbage": b"\x80\x02not a pickle", "empty": b""}[damage]
    )
    with pytest.raises(DatasetCorruptError, match="data_batch_4") as info:
        load("cifar10", data_dir=tmp_path)
    assert "--set data.download=true" in str(info.value) and isinstance(info.value, ValueError)


def test_cifar10_wrong_content_is_refused(tmp_path: Path) -> None:
    fx = write_cifar10(tmp_path)
    bad = {b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    (fx.folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetCorruptError, match=r"test_batch.*shape \(N, 3072\)"):
        load("cifar10", "test", data_dir=tmp_path)
    bad = {b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 10]}
    (fx.folder / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetCorruptError, match=r"test_batch.*labels outside"):
        load("cifar10", "test", data_dir=tmp_path)


def test_pickle_carrying_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": MaliciousPickle(f"touch {marker}"), b"labels": []}, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|nt|os)\.system"):
        restricted_load(payload)
    fx = write_cifar10(tmp_path / "data")
    (fx.folder / "data_batch_1").write_bytes(payload)
    with pytest.raises(DatasetCorruptError, match=r"data_batch_1.*refusing to load global"):
        load("cifar10", data_dir=tmp_path / "data")
    assert not marker.exists()


def test_restricted_unpickler_rebuilds_arrays_only() -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 4, 5):
        out = restricted_load(pickle.dumps({b"a": array, b"l": [1, 2]}, protocol=protocol))
        assert np.array_equal(out[b"a"], array) and out[b"l"] == [1, 2]
    with pytest.raises(UnsafePickleError, match=r"(__builtin__|builtins)\.eval"):
        restricted_load(pickle.dumps(eval, protocol=2))


def test_cifar10_download_checks_md5_and_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, fx = make_cifar10_archive(tmp_path)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(cifar_module, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cifar_module, "CIFAR10_MD5", md5)
    root = tmp_path / "data"
    ds = load("cifar10", "test", data_dir=root, download=True)
    assert torch.equal(ds.labels, torch.from_numpy(fx.test_labels))
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar10_download_with_wrong_md5_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, _ = make_cifar10_archive(tmp_path)
    monkeypatch.setattr(cifar_module, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cifar_module, "CIFAR10_MD5", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError, match=r"md5 .*expected 0{32}"):
        load("cifar10", data_dir=root, download=True)
    assert list(root.iterdir()) == []


def test_download_file_tries_mirrors_in_order(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    good.write_bytes(b"payload")
    md5 = hashlib.md5(b"payload").hexdigest()
    dest = tmp_path / "out" / "file.bin"
    download_file([(tmp_path / "missing.bin").as_uri(), good.as_uri()], dest, md5)
    assert dest.read_bytes() == b"payload"
    with pytest.raises(DownloadError, match="missing.bin"):
        download_file([(tmp_path / "missing.bin").as_uri()], tmp_path / "out" / "other.bin", md5)


def _tar_with(path: Path, member: tarfile.TarInfo, content: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member.size = len(content)
        tar.addfile(member, io.BytesIO(content) if content else None)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_safe_extract_refuses_escaping_members(tmp_path: Path, kind: str) -> None:
    if kind == "dotdot":
        member, content = tarfile.TarInfo("cifar-10-batches-py/../../evil"), b"x"
    elif kind == "absolute":
        member, content = tarfile.TarInfo(str(tmp_path / "evil")), b"x"
    else:
        member, content = tarfile.TarInfo("cifar-10-batches-py/link"), b""
        member.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        member.linkname = "/etc/passwd"
    archive = _tar_with(tmp_path / "a.tar.gz", member, content)
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(DatasetCorruptError, match="refusing"):
        safe_extract_tar(archive, dest, only="cifar-10-batches-py")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "dest" / "evil").exists()
    assert list(dest.iterdir()) == []


def test_atomic_path_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "f.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert dest.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with atomic_path(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# -------------------------------------------------------------------------------- IDX, MNIST, Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name, folder", [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist")])
def test_idx_datasets_read_plain_and_gzipped(tmp_path: Path, gz: bool, name: str, folder: str) -> None:
    fx = write_idx_dataset(tmp_path / folder, n_train=20, n_test=10, gz=gz)
    train = load(name, "train", data_dir=tmp_path)
    test = load(name.replace("_", "-"), "test", data_dir=tmp_path, n=7)
    assert train.images.shape == (20, 1, 28, 28) and len(test) == 7 and train.name == name
    assert torch.equal((train.images[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(fx.train_images))
    assert torch.equal(train.labels, torch.from_numpy(fx.train_labels).long())
    assert torch.equal(test.labels, torch.from_numpy(fx.test_labels[:7]).long())
    assert train.num_classes == 10 and len(train.classes) == 10


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.uint8).reshape(2, 3),
        np.arange(-3, 3, dtype=np.int8),
        np.arange(4, dtype=">i2"),
        np.arange(6, dtype=">i4").reshape(3, 2, 1),
        np.linspace(0, 1, 5).astype(">f4"),
        np.linspace(0, 1, 5),
    ],
)
def test_parse_idx_round_trips_every_type(array: np.ndarray) -> None:
    out = parse_idx(idx_bytes(array))
    assert out.shape == array.shape and np.array_equal(out, array)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "not an IDX file"),
        (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x05", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x01", "truncated IDX header"),
        (
            b"\x00\x00\x08\x01" + b"\x00\x00\x00\x04" + b"\x01\x02",
            r"truncated: header announces shape \(4,\)",
        ),
        (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x01\x02", "trailing bytes"),
    ],
)
def test_parse_idx_rejects_malformed_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DatasetCorruptError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value) and info.value.path == path


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_gzip_is_named(tmp_path: Path, damage: str) -> None:
    write_idx_dataset(tmp_path / "mnist", gz=True)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 20]
    else:
        raw[-6] ^= 0xFF  # inside the CRC / size trailer
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetCorruptError, match="train-images-idx3-ubyte.gz") as info:
        load("mnist", data_dir=tmp_path)
    assert "--set data.download=true" in str(info.value)


def test_idx_dataset_structure_is_checked(tmp_path: Path) -> None:
    fx = write_idx_dataset(tmp_path / "mnist", n_train=20, gz=False)
    write_idx(fx.folder / "train-labels-idx1-ubyte", fx.train_labels[:19], gz=False)
    with pytest.raises(DatasetCorruptError, match="expected 20 uint8 labels"):
        load("mnist", data_dir=tmp_path)
    write_idx(fx.folder / "train-labels-idx1-ubyte", np.full(20, 10, dtype=np.uint8), gz=False)
    with pytest.raises(DatasetCorruptError, match=r"label 10 outside \[0, 10\)"):
        load("mnist", data_dir=tmp_path)
    write_idx(fx.folder / "train-images-idx3-ubyte", np.zeros((20, 32, 32), dtype=np.uint8), gz=False)
    with pytest.raises(DatasetCorruptError, match=r"train-images-idx3-ubyte.*shape \(N, 28, 28\)"):
        load("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="only 10 samples"):
        load("mnist", "test", data_dir=tmp_path, n=11)


def test_idx_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetNotFoundError, match=r"MNIST train files not found.*--set data\.download=true"
    ) as info:
        load("mnist", data_dir=tmp_path)
    assert str(tmp_path / "mnist") in str(info.value)
    fx = write_idx_dataset(tmp_path / "mnist", gz=True)
    (fx.folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        load("mnist", "test", data_dir=tmp_path)
    source = dataclasses.replace(FASHION_MNIST, system_dirs=(tmp_path / "no-debian",))
    with pytest.raises(
        DatasetNotFoundError, match=r"apt-get install dataset-fashion-mnist.*data\.download=true.*data-dir"
    ):
        load_idx_dataset(source, "train", data_dir=tmp_path)


def test_idx_download_checks_md5(tmp_path: Path) -> None:
    mirror = write_idx_dataset(tmp_path / "mirror", n_train=12, gz=True)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in mirror.folder.iterdir()}
    source = dataclasses.replace(MNIST, mirrors=(mirror.folder.as_uri() + "/",), md5=md5)
    ds = load_idx_dataset(source, "train", data_dir=tmp_path / "data", download=True)
    assert torch.equal(ds.labels, torch.from_numpy(mirror.train_labels).long())
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]
    wrong = dataclasses.replace(source, md5={**md5, "t10k-images-idx3-ubyte.gz": "0" * 32})
    refused = r"(?s)could not download t10k-images-idx3-ubyte.gz.*md5 [0-9a-f]+, expected 0{32}"
    with pytest.raises(DatasetNotFoundError, match=refused):
        load_idx_dataset(wrong, "test", data_dir=tmp_path / "data", download=True)


@pytest.mark.realdata
def test_fashion_mnist_from_the_debian_folder(tmp_path: Path) -> None:
    if not (DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{DEBIAN_FASHION} is absent: apt-get install dataset-fashion-mnist to run this test")
    ds = load("fashion_mnist", "test", data_dir=tmp_path)  # empty data folder: falls back to Debian's
    assert ds.images.shape == (10_000, 1, 28, 28) and ds.classes[9] == "Ankle boot"
    assert torch.bincount(ds.labels, minlength=10).tolist() == [1000] * 10
    assert 0.2 < ds.images.mean().item() < 0.4  # Fashion-MNIST's mean pixel is about 0.286


# ---------------------------------------------------------------------------------------------- shapes10

#: SHA-256 of the first 20 train images for seed 0. It pins the generator's output across machines and
#: library versions; a change that alters it must also bump ``shapes.GENERATOR_VERSION``.
SHAPES10_DIGEST = "2eb41bbcc320d258ef9c2014c5aa94cbf5a9a3fec91d5eeca7d8c3bc44b69acf"


def test_shapes10_is_bitwise_reproducible() -> None:
    a = shapes_module.generate_shapes10(20, seed=0)
    b = shapes_module.generate_shapes10(20, seed=0)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert hashlib.sha256(a["images"].tobytes()).hexdigest() == SHAPES10_DIGEST


def test_shapes10_seeds_splits_and_prefixes() -> None:
    base = shapes_module.generate_shapes10(1010, seed=0)
    other_seed = shapes_module.generate_shapes10(20, seed=1)
    test = shapes_module.generate_shapes10(20, seed=0, split="test")
    short = shapes_module.generate_shapes10(20, seed=0)
    assert not np.array_equal(base["images"][:20], other_seed["images"])
    assert not np.array_equal(base["images"][:20], test["images"])
    for key in base:
        assert np.array_equal(base[key][:20], short[key]), key
    # Images of the second block are new images, not a copy of the first block.
    assert not np.array_equal(base["images"][1000:1010], base["images"][:10])


def test_shapes10_dataset_content(tmp_path: Path) -> None:
    ds = load("shapes10", "train", data_dir=tmp_path, n=200)
    assert ds.images.shape == (200, 3, 32, 32) and ds.images.dtype == torch.float32
    assert ds.classes == shapes_module.SHAPES10_CLASSES and ds.num_classes == 10
    assert torch.bincount(ds.labels, minlength=10).tolist() == [20] * 10
    assert ds.masks is not None and ds.masks.shape == (200, 32, 32) and ds.masks.dtype == torch.bool
    assert (ds.masks.sum(dim=(1, 2)) >= 20).all()  # every labelled shape covers some pixels
    assert ds.attributes is not None
    assert set(ds.attributes) == {"colour", "size", "x", "y", "rotation", "difficulty"}
    assert ds.attributes["colour"].dtype == torch.int64 and int(ds.attributes["colour"].max()) < 8
    assert ((ds.attributes["rotation"] >= -np.pi) & (ds.attributes["rotation"] <= np.pi)).all()
    # The mask lies around the recorded centre.
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    m = ds.masks.float()
    mask_x = (m * xs).sum(dim=(1, 2)) / m.sum(dim=(1, 2))
    mask_y = (m * ys).sum(dim=(1, 2)) / m.sum(dim=(1, 2))
    assert (mask_x - ds.attributes["x"]).abs().median() < 2.0
    assert (mask_y - ds.attributes["y"]).abs().median() < 2.0


def test_shapes10_is_cached_and_bad_caches_are_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load("shapes10", "test", data_dir=tmp_path, n=30, seed=3)
    cache = tmp_path / "shapes10" / f"shapes10-v{shapes_module.GENERATOR_VERSION}-test-seed3-n30.npz"
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as mp:
        mp.setattr(shapes_module, "generate_shapes10", fail)
        again = load("shapes10", "test", data_dir=tmp_path, n=30, seed=3)
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning, match="regenerating"):
        repaired = load("shapes10", "test", data_dir=tmp_path, n=30, seed=3)
    assert torch.equal(first.images, repaired.images)
    assert np.load(cache)["images"].shape == (30, 3, 32, 32)


def test_shapes10_works_when_the_cache_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path) -> None:
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(shapes_module, "atomic_path", refuse)
    with pytest.warns(UserWarning, match="could not cache shapes10"):
        ds = load("shapes10", "train", data_dir=tmp_path, n=10)
    assert len(ds) == 10 and not (tmp_path / "shapes10").exists()


def test_shapes10_difficulty_scales_only_the_nuisances() -> None:
    """The setting multiplies each image's difficulty draw; everything else is the same stream."""
    full = shapes_module.generate_shapes10(30, seed=0)
    # The default, 1 as a float or an int, is the data set as it was before the setting existed.
    for one in (1.0, 1):
        same = shapes_module.generate_shapes10(20, seed=0, difficulty=one)
        assert hashlib.sha256(same["images"].tobytes()).hexdigest() == SHAPES10_DIGEST
    for setting in (0.0, 0.3, 0.5):
        part = shapes_module.generate_shapes10(30, seed=0, difficulty=setting)
        for key in ("labels", "masks", "colour", "size", "x", "y", "rotation"):
            assert np.array_equal(part[key], full[key]), (setting, key)
        assert np.array_equal(part["difficulty"], full["difficulty"] * np.float32(setting))
        assert not np.array_equal(part["images"], full["images"])
    # At 0 every image is clean: more than 3 pixels from the labelled shape's mask (the star's and the
    # crescent's distance functions are not exact, so their anti-aliasing reaches past 1 pixel), the
    # background is one flat colour (no texture, stripes, distractors or noise).
    clean = shapes_module.generate_shapes10(30, seed=0, difficulty=0.0)
    near = torch.nn.functional.max_pool2d(torch.from_numpy(clean["masks"]).float()[:, None], 7, 1, 3)[:, 0]
    background = ~near.bool().numpy()
    for image, where in zip(clean["images"], background, strict=True):
        assert where.sum() > 300
        assert all(len(np.unique(channel[where])) == 1 for channel in image)
    # Lower settings give smoother images: the mean absolute difference between neighbouring pixels falls.
    images = [shapes_module.generate_shapes10(30, seed=0, difficulty=s)["images"] for s in (0.0, 0.5, 1.0)]
    roughness = [np.abs(np.diff(x.astype(np.float64))).mean() for x in images]
    assert roughness[0] < roughness[1] < roughness[2]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_shapes10_difficulty_is_checked(bad: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"difficulty must be a number in \[0, 1\]"):
        shapes_module.generate_shapes10(10, difficulty=bad)  # type: ignore[arg-type]
    if bad is not None:  # load's None is the data set's default
        with pytest.raises(ValueError, match=r"difficulty must be a number in \[0, 1\]"):
            load("shapes10", n=10, data_dir=tmp_path, difficulty=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "shapes10").exists()


def test_only_shapes10_has_a_difficulty_setting(tmp_path: Path) -> None:
    assert data.has_difficulty("shapes10") and not data.has_difficulty("cifar10")
    assert not data.has_difficulty("fashion-mnist") and not data.has_difficulty("mnist")
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        data.has_difficulty("nope")
    with pytest.raises(ValueError, match="dataset 'mnist' has no difficulty setting"):
        load("mnist", data_dir=tmp_path, difficulty=0.5)


def test_shapes10_cache_names_the_difficulty_setting(tmp_path: Path) -> None:
    stem = f"shapes10-v{shapes_module.GENERATOR_VERSION}-train-seed0-n30"
    default = load("shapes10", data_dir=tmp_path, n=30)
    one = load("shapes10", data_dir=tmp_path, n=30, difficulty=1)
    half = load("shapes10", data_dir=tmp_path, n=30, difficulty=0.5)
    # The default keeps the name caches had before the setting existed; another setting has its own file.
    names = sorted(p.name for p in (tmp_path / "shapes10").iterdir())
    assert names == [f"{stem}-d0.5.npz", f"{stem}.npz"]
    assert torch.equal(default.images, one.images) and not torch.equal(default.images, half.images)
    again = load("shapes10", data_dir=tmp_path, n=30, difficulty=0.5)
    assert torch.equal(half.images, again.images)
    assert torch.equal(half.attributes["difficulty"], default.attributes["difficulty"] * 0.5)


# -------------------------------------------------------------------------------------------- ImageDataset


def _toy(n: int = 10, classes: int = 3) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(
        images=torch.rand(n, 2, 4, 5, generator=g),
        labels=torch.arange(n) % classes,
        num_classes=classes,
        classes=[f"c{i}" for i in range(classes)],
        name="toy",
    )


def test_image_dataset_interface() -> None:
    ds = _toy()
    assert len(ds) == 10 and ds.input_shape == (2, 4, 5)
    x, y = ds[3]
    assert torch.equal(x, ds.images[3]) and y.item() == 0
    sub = ds.subset(torch.tensor([1, 4]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 1] and sub.name == "toy"
    assert isinstance(ds, torch.utils.data.Dataset)


def test_image_dataset_validates_its_fields() -> None:
    ds = _toy()
    fields = dataclasses.asdict(ds)
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"images": ds.images.double()}, TypeError, "images must be a float32"),
        ({"labels": ds.labels.int()}, TypeError, "labels must be an int64"),
        ({"labels": ds.labels[:9]}, ValueError, "10 images but 9 labels"),
        ({"labels": ds.labels + 1}, ValueError, r"labels must lie in \[0, 3\)"),
        ({"images": ds.images * 2}, ValueError, r"must lie in \[0, 1\]"),
        ({"images": torch.where(ds.images > 0.5, torch.nan, ds.images)}, ValueError, r"must lie in \[0, 1\]"),
        ({"classes": ["a"]}, ValueError, "1 class names"),
        ({"masks": torch.zeros(10, 4, 4, dtype=torch.bool)}, TypeError, "masks must be a bool"),
        ({"attributes": {"x": torch.zeros(3)}}, TypeError, "attribute 'x'"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            ImageDataset(**{**fields, **change})


# -------------------------------------------------------------------------------------------- DeviceLoader


def _batches(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


def test_loader_order_is_a_function_of_seed_and_epoch() -> None:
    ds = _toy(n=50)
    first = DeviceLoader(ds, 8, shuffle=True, seed=7)
    first.set_epoch(3)
    resumed = DeviceLoader(ds, 8, shuffle=True, seed=7)  # e.g. a run resumed at epoch 3
    resumed.set_epoch(3)
    assert _same(_batches(first), _batches(resumed))
    assert _same(_batches(first), _batches(first))  # iterating again replays the epoch
    order3 = first.indices()
    first.set_epoch(4)
    assert not torch.equal(order3, first.indices())
    assert not torch.equal(order3, DeviceLoader(ds, 8, shuffle=True, seed=8).indices())
    assert sorted(order3.tolist()) == list(range(50))
    assert torch.equal(DeviceLoader(ds, 8).indices(), torch.arange(50))


def test_loader_batches_and_length() -> None:
    ds = _toy(n=50)
    loader = DeviceLoader(ds, 8)
    batches = _batches(loader)
    assert len(loader) == len(batches) == 7 and batches[-1][0].shape == (2, 2, 4, 5)
    assert torch.equal(torch.cat([y for _, y in batches]), ds.labels)
    assert batches[0][0].device == torch.device("cpu")
    dropping = DeviceLoader(ds, 8, drop_last=True)
    assert len(dropping) == len(_batches(dropping)) == 6


@pytest.mark.parametrize("n, world", [(10, 3), (12, 4), (5, 8)])
def test_loader_shards_are_disjoint_equal_and_cover(n: int, world: int) -> None:
    ds = _toy(n=n)
    shards = [DeviceLoader(ds, 2, shuffle=True, seed=1, rank=r, world_size=world) for r in range(world)]
    for s in shards:
        s.set_epoch(2)
    parts = [s.indices() for s in shards]
    per_rank = -(-n // world)
    assert all(len(p) == per_rank == s.num_samples for p, s in zip(parts, shards, strict=True))
    assert all(len(s) == -(-per_rank // 2) for s in shards)
    # Interleaving the shards gives back the padded epoch order: disjoint positions, full coverage.
    full = DeviceLoader(ds, 2, shuffle=True, seed=1)
    full.set_epoch(2)
    padded = torch.stack(parts, dim=1).reshape(-1)
    order = full.indices()
    assert torch.equal(padded[:n], order)
    assert torch.equal(padded[n:], order.repeat(world)[: per_rank * world - n])
    assert set(padded.tolist()) == set(range(n))


def test_loader_rejects_bad_arguments() -> None:
    ds = _toy()
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(ds, 0)
    with pytest.raises(ValueError, match="rank must lie"):
        DeviceLoader(ds, 2, rank=2, world_size=2)
    with pytest.raises(TypeError, match="ImageDataset"):
        DeviceLoader([1, 2, 3], 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch"):
        DeviceLoader(ds, 2).set_epoch(-1)


def test_loader_augmentation_is_reproducible() -> None:
    ds = _toy(n=40)
    make = lambda: DeviceLoader(ds, 16, shuffle=True, augment=Augment(1), seed=5)  # noqa: E731
    a, b = make(), make()
    a.set_epoch(1)
    b.set_epoch(1)
    first = _batches(a)
    assert _same(first, _batches(b))
    a.set_epoch(2)
    second = _batches(a)
    assert not _same(first, second)
    plain = DeviceLoader(ds, 16, shuffle=True, seed=5)
    plain.set_epoch(1)
    assert not _same(first, _batches(plain))
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(first, _batches(plain), strict=True))


# ------------------------------------------------------------------------------------------------ Augment


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) shifted with zero fill: ``out[:, i, j] = image[:, i + dy, j + dx]``."""
    c, h, w = image.shape
    pad = max(abs(dy), abs(dx))
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    return padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def test_augment_crop_is_a_zero_padded_shift_per_sample() -> None:
    x = torch.rand(32, 3, 6, 7, generator=torch.Generator().manual_seed(0)) + 0.1  # no zeros in the input
    out = Augment(crop_padding=2, flip=False)(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    shifts = set()
    for i in range(len(x)):
        match = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(out[i], _shifted(x[i], dy, dx))
        ]
        assert len(match) == 1, i
        shifts.add(match[0])
    assert len(shifts) > 5  # offsets differ between samples


def test_augment_flip_and_crop_compose_like_torchvision() -> None:
    x = torch.rand(64, 2, 5, 5, generator=torch.Generator().manual_seed(0)) + 0.1
    flipped = Augment(crop_padding=0, flip=True)(x, torch.Generator().manual_seed(2))
    is_flip = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(64)]
    is_same = [torch.equal(flipped[i], x[i]) for i in range(64)]
    assert all(f != s for f, s in zip(is_flip, is_same, strict=True)) and 10 < sum(is_flip) < 54
    both = Augment(crop_padding=1, flip=True)(x, torch.Generator().manual_seed(3))
    for i in range(64):
        candidates = [_shifted(x[i], dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        # Each output is a zero-padded shift of its input, mirrored or not.
        assert any(torch.equal(both[i], c) or torch.equal(both[i], c.flip(-1)) for c in candidates), i


def test_augment_is_driven_by_its_generator() -> None:
    x = torch.rand(16, 3, 8, 8)
    aug = Augment()
    a = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(1)))
    assert torch.equal(Augment(crop_padding=0, flip=False)(x), x)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        aug(x[0])
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)


def test_loader_carries_extra_targets_with_the_same_samples() -> None:
    ds = _toy(n=20)
    multi_hot = torch.arange(40.0).view(20, 2)
    index = torch.arange(20)
    loader = DeviceLoader(ds, 6, shuffle=True, seed=3, targets=(multi_hot, index))
    seen = []
    for x, y, t, i in loader:
        assert torch.equal(x, ds.images[i]) and torch.equal(y, ds.labels[i]) and torch.equal(t, multi_hot[i])
        seen += i.tolist()
    assert sorted(seen) == list(range(20))
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        DeviceLoader(ds, 6, targets=(torch.zeros(19),))
