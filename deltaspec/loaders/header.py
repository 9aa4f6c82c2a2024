"""The one safetensors header reader: a file's tensors (dtype, shape, byte range) from its header,
without torch, refusing what the ``safetensors`` library refuses; and one tensor read as float32
with numpy. The plan (:mod:`deltaspec.plan`) decides each module's route from these headers and
the numpy executor (:mod:`deltaspec.engine.host`) reads its factors through them.

Format: an 8-byte little-endian header length, a UTF-8 JSON header of name → dtype, shape,
data_offsets (and an optional ``__metadata__`` of text → text), then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from deltaspec.names import MAX_NAME

# safetensors dtype → (little-endian storage dtype, widening to float32: exact for each)
DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}
# bytes per element of the other safetensors dtypes (entries of these are read, never widened)
SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER = 100_000_000  # the safetensors library's own limit on the header


class HeaderError(ValueError):
    """A header the safetensors library would refuse, or a dtype this reader does not widen."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: stored dtype, shape and absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(fh: BinaryIO) -> dict[str, Entry]:
    """The tensors of a safetensors file (format: an 8-byte little-endian header length, a UTF-8
    JSON header of name → dtype, shape, data_offsets, then the data): HeaderError wherever the
    safetensors library (or the loader's store) would refuse the file — a header over 100 MB or
    not strict UTF-8 JSON, a repeated name, a name over :data:`~deltaspec.names.MAX_NAME`
    characters, metadata that is not text → text, a shape or offset that is not a non-negative
    integer, byte ranges that do not tile the data exactly, a dtype it does not know."""
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(8)
    if len(head) != 8:
        raise HeaderError("safetensors file shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, MAX_HEADER):
        raise HeaderError("safetensors header runs past the end of the file or is too large")
    try:
        header = json.loads(fh.read(n).decode("utf-8"), object_pairs_hook=_unique,
                            parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HeaderError(f"safetensors header is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise HeaderError("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(_text(k) and _text(v) for k, v in meta.items()):
        raise HeaderError("safetensors __metadata__ is not a mapping of text to text")
    out = {key: _entry(key, e, 8 + n) for key, e in header.items()}
    at = 8 + n
    for e in sorted(out.values(), key=lambda e: (e.start, e.end)):
        if e.start != at:
            raise HeaderError("safetensors byte ranges overlap or leave a gap")
        at = e.end
    if at != size:
        raise HeaderError("safetensors byte ranges do not end at the end of the file")
    return out


def _entry(key: str, e: Any, base: int) -> Entry:
    if not (_text(key) and len(key) <= MAX_NAME and isinstance(e, dict) and _text(e.get("dtype"))
            and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)
            and len(e["data_offsets"]) == 2 and all(map(_count, e["shape"] + e["data_offsets"]))):
        raise HeaderError(f"tensor {key[:60]!r}: not a safetensors entry deltaspec reads here")
    dtype, shape, (start, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
    if dtype not in SIZES or end - start != math.prod(shape) * SIZES[dtype]:
        raise HeaderError(f"tensor {key[:60]!r}: dtype {dtype} or its byte range is not valid")
    return Entry(dtype, shape, base + start, base + end)


def _count(x: Any) -> bool:
    return type(x) is int and x >= 0  # not a bool, a float or a string of digits


def _text(x: Any) -> bool:
    """A str that UTF-8 can hold (JSON's lone surrogate escapes cannot be)."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_constant(name: str) -> Any:
    raise HeaderError(f"safetensors header holds {name}, which is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise HeaderError("a name repeated in a safetensors header")
    return dict(pairs)


def read_float32(fh: BinaryIO, e: Entry) -> np.ndarray:
    """One tensor (of a dtype in :data:`DTYPES`) as float32, as the loader reads it (bfloat16 and
    float16 exactly; float64 rounded, as ``Tensor.to(torch.float32)`` does)."""
    fh.seek(e.start)
    raw = np.frombuffer(fh.read(e.end - e.start), dtype=DTYPES[e.dtype])
    if e.dtype == "BF16":  # bfloat16 is the top half of a float32
        wide = raw.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32).reshape(e.shape)
    return raw.astype(np.float32).reshape(e.shape)


__all__ = ["DTYPES", "SIZES", "Entry", "HeaderError", "read_float32", "read_header"]
