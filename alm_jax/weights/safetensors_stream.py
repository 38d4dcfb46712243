"""Write a safetensors file one tensor at a time (peak host memory: one tensor, not the whole model).

The layout (names, dtypes, shapes) is declared up front so the header can be written first; the tensors
then arrive in that order from an iterator and each is checked against its declaration.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from alm_jax.errors import WeightImportError

_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}


def write_safetensors(
    path: str | Path,
    layout: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Stream `tensors` (name, array) into `path`, in the order and with the shapes given by `layout`.

    Raises WeightImportError if a tensor is missing, extra, out of order, or has the wrong shape/dtype.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    expected = []
    for name, shape, dtype in layout:
        dtype = np.dtype(dtype)
        if dtype not in _ST_DTYPES:
            raise WeightImportError(f"{name}: dtype {dtype} cannot be written to safetensors here")
        if name in header:
            raise WeightImportError(f"{name}: declared twice in the safetensors layout")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        expected.append((name, tuple(shape), dtype))
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment with spaces

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        it = iter(tensors)
        for name, shape, dtype in expected:
            got = next(it, None)
            if got is None:
                raise WeightImportError(f"{name}: declared in the layout but never produced")
            got_name, array = got
            if got_name != name:
                raise WeightImportError(f"{got_name}: produced out of order (expected {name})")
            if array.shape != shape or array.dtype != dtype:
                raise WeightImportError(
                    f"{name}: produced {array.dtype}{list(array.shape)}, declared {dtype}{list(shape)}"
                )
            array = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<"))  # no copy when already so
            f.write(memoryview(array).cast("B"))
        extra = next(it, None)
        if extra is not None:
            raise WeightImportError(f"{extra[0]}: produced but not declared in the layout")
