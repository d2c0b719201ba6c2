"""A strict reader of the IDX format (MNIST, Fashion-MNIST), gzipped or not.

Layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian uint32
sizes, then the values in C order (big-endian for multi-byte types). The reader checks each of these
and that the payload has exactly the announced length, so a truncated or padded file is an error and
never a silently shorter dataset.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from lipnet.data.errors import DatasetCorruptError

__all__ = ["IDX_TYPES", "parse_idx", "read_idx"]

#: IDX type code -> numpy dtype (big-endian, as the format stores them).
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, source: str | Path = "<bytes>") -> np.ndarray:
    """Decode the bytes of one (uncompressed) IDX file; ``source`` names it in error messages.

    Raises:
        DatasetCorruptError: bad magic, unknown type code, zero dimensions, or a payload whose length
            differs from the one the header announces.
    """
    if len(data) < 4:
        raise DatasetCorruptError(source, f"{source}: only {len(data)} bytes, too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise DatasetCorruptError(
            source, f"{source}: not an IDX file (magic starts with {data[:2].hex()}, expected 0000)"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        raise DatasetCorruptError(source, f"{source}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise DatasetCorruptError(source, f"{source}: IDX header announces 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetCorruptError(
            source, f"{source}: truncated IDX header ({len(data)} bytes, need {header})"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        state = "truncated" if actual < expected else "has trailing bytes"
        raise DatasetCorruptError(
            source,
            f"{source}: {state}: header announces shape {dims} "
            f"({expected} bytes of data) but the file holds {actual}",
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file; a name ending in ``.gz`` is decompressed (and its CRC checked) first.

    Raises:
        DatasetCorruptError: the gzip stream or the IDX content is damaged.
    """
    path = Path(path)
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                data = f.read()
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise DatasetCorruptError(path, f"{path}: damaged gzip file ({err})") from err
    else:
        data = path.read_bytes()
    return parse_idx(data, path)
