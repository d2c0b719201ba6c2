"""Files: the one atomic writer, the one checkpoint error, and the one probe for the plot extra.

* :func:`atomic_write_bytes` (and ``_text`` / ``_json``) writes a file through a temporary file in the
  same folder, named ``.NAME.<16 hex digits>.tmp`` (:data:`TEMP_NAME` matches exactly those names,
  so that a run folder can delete what a killed write left behind), then ``os.replace``: readers
  see the old file or the new one, never a partial write. :func:`atomic_write_files` commits
  several files of one folder the same way, all temporaries first.
* :class:`CheckpointError` is raised by every reader of weights or checkpoints (certify's model
  loading, lipnet's run folders): catching it catches every "this file cannot be loaded".
* :func:`matplotlib_available` says whether the optional ``plot`` extra is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "TEMP_NAME",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_write_json",
    "atomic_write_text",
    "matplotlib_available",
]


class CheckpointError(ValueError):
    """A checkpoint or model file cannot be loaded: missing, unsafe to unpickle, corrupted, or not
    fitting the architecture or the program that reads it."""


#: Name of the atomic writer's temporary file (or folder) for ``NAME``: ``.NAME.<16 hex digits>.tmp``.
#: Only names of this form are deleted as leftovers of a killed write.
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _write_flushed(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist), write ``data`` and flush it to disk; remove it on error."""
    # O_EXCL: never write through a file or link that is already there (64 random bits make a
    # collision an error in theory only); mode 0o666 & ~umask, as a plain open() would create it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def _write_temporary(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (see :data:`TEMP_NAME`); returns its path."""
    tmp = _temp_path(path)
    _write_flushed(tmp, data)
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see either the old file or the new one, never a partial write; on any error the
    temporary file is removed and the old file is untouched. A process killed mid-write leaves
    the temporary file ``.NAME.<16 hex digits>.tmp`` behind (:data:`TEMP_NAME`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 text (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_files(folder: str | Path, files: Mapping[str, bytes]) -> list[Path]:
    """Write ``files`` (name -> content) into ``folder``: all or, on any error, none of them.

    A folder that does not exist yet is written whole as a temporary folder beside it
    (``.NAME.<16 hex digits>.tmp``) and renamed into place, so it appears with every file at once.
    In an existing folder every file is first written to its own temporary file and flushed, and
    only then are they renamed over the old ones, one ``os.replace`` each: a failing write leaves
    the old files untouched. Returns the paths written, in the order of ``files``.
    """
    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(files)
    if not out.exists():
        staging = _temp_path(out)
        staging.mkdir()
        try:
            for name in names:
                _write_flushed(staging / name, files[name])
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return [out / name for name in names]
    written: dict[str, Path] = {}
    try:
        for name in names:
            written[name] = _write_temporary(out / name, files[name])
        for name in names:
            os.replace(written[name], out / name)
            del written[name]
    finally:
        for tmp in written.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return [out / name for name in names]


def matplotlib_available() -> bool:
    """Whether matplotlib (the optional ``plot`` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
