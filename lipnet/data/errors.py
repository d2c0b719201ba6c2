"""Errors raised when a dataset's files are missing or damaged.

Both subclass the built-in exception a caller would naturally catch (``FileNotFoundError`` for a file
that is not there, ``ValueError`` for content that cannot be right), and both carry the offending path
so a command-line front end can print it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR_HINT", "DOWNLOAD_HINT", "DatasetCorruptError", "DatasetNotFoundError"]

#: How a user asks for a download, in the messages of a missing dataset: the config key (there is no
#: ``--download`` flag; ``certify`` and ``audit`` read data that training or the user put in place).
DOWNLOAD_HINT = "--set data.download=true for lipnet train and sweep, download=True in Python"

#: Where the data folder comes from, in the messages of a missing dataset.
DATA_DIR_HINT = (
    "data.data_dir in the config, --data-dir for lipnet certify, audit and bench fmnist; "
    "the default is $LIPNET_DATA, else ./data"
)


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
