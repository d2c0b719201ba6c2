"""Unpickling of dataset files that can only rebuild numpy arrays and plain containers.

A pickle is a program: any global it names is imported and may be called, so a tampered dataset file
could run arbitrary code (``os.system`` through ``__reduce__``). :class:`RestrictedUnpickler` resolves
only the handful of globals that numpy arrays need; every other global is refused before it is looked
up, so nothing outside that list is ever imported or called.
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
from collections.abc import Callable
from typing import IO, Any

import numpy as np

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "restricted_load"]


def _numpy_private(module: str, name: str) -> Callable[..., Any]:
    """numpy's private function ``name`` of core submodule ``module`` (absent from numpy's type stubs).

    numpy >= 2 moved the implementation to numpy._core; both names appear in real files.
    """
    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except (ImportError, AttributeError):  # pragma: no cover - numpy 1.x
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


_reconstruct = _numpy_private("multiarray", "_reconstruct")
_frombuffer = _numpy_private("numeric", "_frombuffer")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""


def _latin1_encode(text: str, encoding: str) -> bytes:
    # Python 3 writes bytes in protocol <= 2 as _codecs.encode(text, "latin1"); no other codec is needed.
    if encoding != "latin1":
        raise UnsafePickleError(
            f"refusing _codecs.encode with encoding {encoding!r} (only 'latin1' is allowed)"
        )
    return codecs.encode(text, "latin1")


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    # Protocol 5 pickles rebuild arrays from a raw buffer instead.
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` only returns numpy's array-rebuilding globals."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: dataset pickles may only contain numpy arrays "
                "and plain Python containers (the file may have been tampered with)"
            ) from None


def restricted_load(file: IO[bytes] | bytes, *, encoding: str = "bytes") -> Any:
    """Unpickle ``file`` (a binary stream or bytes) with :class:`RestrictedUnpickler`.

    ``encoding="bytes"`` reads Python 2 ``str`` objects (as in the CIFAR-10 files) as ``bytes``.
    """
    stream = io.BytesIO(file) if isinstance(file, bytes) else file
    return RestrictedUnpickler(stream, encoding=encoding).load()
