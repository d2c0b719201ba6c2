"""Where datasets live on disk, and how they get there: checked downloads, safe extraction, atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from lipnet.data.errors import DatasetCorruptError

__all__ = [
    "DownloadError",
    "atomic_path",
    "default_data_dir",
    "download_file",
    "file_md5",
    "resolve_data_dir",
    "safe_extract_tar",
]

#: Environment variable that overrides the default data folder.
DATA_ENV = "LIPNET_DATA"

_CHUNK = 1 << 20


class DownloadError(OSError):
    """No mirror delivered a file with the expected checksum."""


class _ChecksumMismatch(Exception):
    """One mirror delivered content with the wrong checksum (the next one is tried)."""


def default_data_dir() -> Path:
    """``$LIPNET_DATA`` when set and non-empty, else ``./data`` (relative to the working directory)."""
    env = os.environ.get(DATA_ENV, "").strip()
    return Path(env).expanduser() if env else Path("data")


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir`` as a ``Path`` (``~`` expanded), or :func:`default_data_dir` when it is ``None``."""
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


def file_md5(path: str | Path) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest`` in one ``os.replace``.

    Readers therefore see either the old file or the complete new one, never a half-written file; on
    error the temporary file is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_file(urls: Sequence[str], dest: str | Path, md5: str, *, timeout: float = 60.0) -> Path:
    """Fetch ``dest`` from the first of ``urls`` that delivers content with the given MD5.

    An existing ``dest`` with the right checksum is kept without any network access. The download is
    streamed into a temporary file and only renamed to ``dest`` once its checksum matches, so an
    interrupted or corrupted transfer never leaves a file that looks complete.

    Raises:
        DownloadError: every URL failed or delivered content with another checksum (all reasons listed).
    """
    dest = Path(dest)
    if dest.is_file() and file_md5(dest) == md5:
        return dest
    failures: list[str] = []
    for url in urls:
        try:
            with atomic_path(dest) as tmp:
                digest = hashlib.md5(usedforsecurity=False)
                with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                    while chunk := response.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != md5:
                    raise _ChecksumMismatch(f"md5 {digest.hexdigest()}, expected {md5}")
            return dest
        except (OSError, _ChecksumMismatch) as err:  # URLError and HTTPError are OSErrors
            failures.append(f"{url}: {err}")
    raise DownloadError(f"could not download {dest.name}:\n  " + "\n  ".join(failures))


def safe_extract_tar(archive: str | Path, dest: str | Path, *, only: str) -> Path:
    """Extract the members of ``archive`` under the top-level folder ``only`` into ``dest``.

    Every member is checked before anything is written: only regular files and folders are accepted
    (no links, devices or FIFOs), and no name may be absolute or contain ``..``, so an archive cannot
    write outside ``dest``. The folder is extracted into a temporary sibling and renamed into place,
    so ``dest / only`` is either absent or complete.

    Raises:
        DatasetCorruptError: the archive is unreadable, holds an unsafe member, or lacks ``only``.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            wanted: list[tarfile.TarInfo] = []
            for member in members:
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts or "\\" in member.name:
                    raise DatasetCorruptError(
                        archive, f"{archive}: refusing unsafe member path {member.name!r}"
                    )
                if not (member.isfile() or member.isdir()):
                    raise DatasetCorruptError(
                        archive,
                        f"{archive}: refusing member {member.name!r} that is not a regular file or folder",
                    )
                if parts and parts[0] == only:
                    wanted.append(member)
            if not wanted:
                raise DatasetCorruptError(archive, f"{archive}: the archive holds no folder {only!r}")
            staging = Path(tempfile.mkdtemp(dir=dest, prefix=f".{only}."))
            try:
                # The checks above already make extraction safe; the "data" filter (Python >= 3.10.12 /
                # 3.11.4) adds a second, independent guard where the interpreter has it.
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members=wanted, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tar.extractall(staging, members=wanted)
                target = dest / only
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staging / only, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DatasetCorruptError(
            archive, f"{archive}: cannot read the archive ({err}); delete it and retry"
        ) from err
    return dest / only
