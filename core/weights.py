"""Model weights in safetensors files, read and written with NumPy alone, bfloat16 included.

NumPy has no bfloat16, so such a tensor is kept as its raw 16-bit patterns and widened to float32 exactly
(a bfloat16 is the top half of a float32) when it is computed with; narrowing rounds to nearest, ties to
even, as torch does. The format is a little-endian u64 header length, a JSON header naming each tensor's
dtype, shape and byte range, then the bytes (https://github.com/huggingface/safetensors).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from core.errors import DuetError

NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # raw bit patterns
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
FLOATS = ("F64", "F32", "F16", "BF16")


class StoredTensor(NamedTuple):
    dtype: str  # the safetensors name: F32, F16, BF16...
    array: np.ndarray  # BF16: the raw uint16 patterns


def read_tensors(path: str | Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Every tensor of a safetensors file as stored, and the file's metadata."""
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        (size,) = struct.unpack("<Q", bytes(data[:8]))
        header = json.loads(bytes(data[8 : 8 + size]))
    except (struct.error, ValueError) as exc:
        raise DuetError(f"{path}: not a safetensors file ({exc}).") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, spec in header.items():
        if spec["dtype"] not in NUMPY_DTYPES:
            raise DuetError(f"{path}: tensor '{name}' has dtype {spec['dtype']}, which Duet cannot merge into.")
        begin, end = (8 + size + offset for offset in spec["data_offsets"])
        array = np.frombuffer(data[begin:end], dtype=NUMPY_DTYPES[spec["dtype"]]).reshape(spec["shape"])
        tensors[name] = StoredTensor(spec["dtype"], array)
    return tensors, metadata


def write_tensors(path: str | Path, tensors: dict[str, StoredTensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``tensors`` (in name order, 8-byte aligned), streamed: never a second copy in memory."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        stored = tensors[name]
        length = stored.array.nbytes
        header[name] = {
            "dtype": stored.dtype,
            "shape": list(stored.array.shape),
            "data_offsets": [offset, offset + length],
        }
        offset += length
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in names:
            handle.write(memoryview(np.ascontiguousarray(tensors[name].array)).cast("B"))


def to_float32(stored: StoredTensor) -> np.ndarray:
    if stored.dtype == "BF16":
        return (stored.array.astype(np.uint32) << 16).view(np.float32)
    return stored.array.astype(np.float32)


def from_float32(values: np.ndarray, dtype: str) -> StoredTensor:
    """``values`` narrowed to ``dtype`` (a float type), rounding to nearest even."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype != "BF16":
        return StoredTensor(dtype, values.astype(NUMPY_DTYPES[dtype]))
    bits = values.view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    return StoredTensor(dtype, np.where(np.isnan(values), np.uint16(0x7FC0), rounded))
