"""Errors raised when a dataset's files are missing or damaged.

Both subclass the built-in exception a caller would naturally catch (``FileNotFoundError`` for a file
that is not there, ``ValueError`` for content that cannot be right), and both carry the offending path
so a command-line front end can print it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DatasetCorruptError", "DatasetNotFoundError"]


class DatasetNotFoundError(FileNotFoundError):
    """A file or folder a dataset needs does not exist; the message says how to get it."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)


class DatasetCorruptError(ValueError):
    """A dataset file exists but is truncated, damaged or not in the expected format."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)
