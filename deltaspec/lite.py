r"""The torch-free route of ``deltaspec analyze`` for plain PEFT LoRA adapters.

``import torch`` alone takes 1.4–3 s on a 2-core machine: more than the whole analysis of a
224-module adapter. For the commonest command, ``deltaspec analyze ADAPTER`` on an adapter of
plain ``lora_A``/``lora_B`` weights in safetensors with no base, this route reads the factors with
numpy and solves each ΔW = s·B·A by the engine's own factored algorithm
(:func:`deltaspec.engine.kernels.factored_batch`):

.. math::  s·B = Q_B R_B,\quad A^\top = Q_A R_A,\quad σ(ΔW) = σ(R_B R_A^\top)

in float64 after the same float32 steps as the loader (bfloat16/float16 widened exactly, B·s
rounded to float32), padded with zeros to min(m, n). The rows come from the same identity columns,
metric table and column order (:mod:`deltaspec.columns`), and CSV/JSON are written without pandas
(:class:`deltaspec.output.Rows`). The two routes agree to LAPACK rounding (tests/test_lite.py).

Anything else declines (None) and the command takes the full route, which owns every error
message: a non-default option it does not honour, an explicit CUDA device, DoRA, biases,
embeddings or convolutions, ``modules_to_save``, trainable tokens, unknown keys, a ``.bin`` file,
a dtype other than float32/float16/bfloat16/float64, a non-finite value, a malformed file, a base
that resolves (given or discovered), or a ``torchrun`` world.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from deltaspec import columns as cols
from deltaspec import patterns
from deltaspec.config_files import parse_json_file
from deltaspec.engine.blas import blas_threads
from deltaspec.errors import DeltaspecError
from deltaspec.loaders import discovery, lora_keys, peft_config
from deltaspec.metrics import spectral_metrics
from deltaspec.names import MAX_NAME, module_order
from deltaspec.options import Options
from deltaspec.output import Rows

# The Options this route honours; every other field must be at its default, or it declines.
# (progress: a run of about a second draws no bar; k: the subspace dimension, used only with a base)
HONOURED = frozenset({"top_k", "k", "include", "allow_modified_base", "progress",
                      "discover_base", "device"})
DEVICES = ("auto", "cpu")  # auto: a factored update of rank r costs O((m + n)·r²) on any device
WEIGHTS = peft_config.WEIGHTS[0]  # adapter_model.safetensors (a .bin needs torch to unpickle)
# safetensors dtype → (little-endian storage dtype, widening to float32: exact for each)
DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}
# QR of a factor this narrow is a string of tiny steps: one BLAS thread is twice as fast on 2 cores
ONE_THREAD_RANK = 64
MAX_HEADER = 100_000_000  # the safetensors library's own limit on the header
class Declined(ValueError):
    """This route does not reproduce the full route's answer for this input."""


# What a malformed file or config raises here: the full route then reports it in its own words.
_DECLINE = (DeltaspecError, OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError,
            RecursionError, struct.error)


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: stored dtype, shape and absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def analyze_rows(path: str, base: str | None, opts: Options) -> Rows | None:
    """The ``analyze`` result of the adapter at ``path`` as :class:`Rows`, or None when this route
    does not apply (then the full route runs). Notes (base discovery) are said only when it does."""
    if base is not None or not _options_ok(opts) or os.environ.get("WORLD_SIZE", "1") != "1":
        return None
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            rows = _rows(Path(path), opts)
        except _DECLINE:
            return None  # the full route says its own notes
    for w in said:  # the discovery note, now that this route answers
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return rows


def _options_ok(opts: Options) -> bool:
    default = Options()
    return opts.device in DEVICES and all(
        getattr(opts, f.name) == getattr(default, f.name)
        for f in dataclasses.fields(Options) if f.name not in HONOURED)


def _rows(path: Path, opts: Options) -> Rows:
    """The rows, or :class:`Declined` (or an error of :data:`_DECLINE`) where the route does not apply."""
    folder = peft_config.find_adapter_dir(path) if path.is_dir() else None
    if folder is None or not (folder / WEIGHTS).is_file():
        raise Declined("not an adapter folder with safetensors weights")
    config_path = folder / peft_config.CONFIG
    config = parse_json_file(config_path)
    if str(config.get("peft_type")).upper() != "LORA" or peft_config.MOE_FORK_KEY in config:
        raise Declined("not a PEFT LoRA adapter")
    peft_config.check_config(config_path, config, opts.allow_modified_base)
    with open(folder / WEIGHTS, "rb") as fh:
        entries = read_header(fh)
        plan = {n: k for n, k in _plan(entries).items()
                if opts.include is None or patterns.search(opts.include, n, "include")}
        if not plan or discovery.choose_base(path, None, discover=opts.discover_base,
                                               fetch=False) is not None:
            raise Declined("no module selected, or a base to analyse against")
        rows = [_row(fh, entries, name, keys, config, opts) for name, keys in plan.items()]
    return Rows(rows, cols.analyze_columns(False))


def _plan(entries: dict[str, Entry]) -> dict[str, dict[str, str]]:
    """Module → {"lora_A": key, "lora_B": key} in the loader's order; :class:`Declined` unless
    every tensor is a plain 2-D factor of a linear LoRA module of rank below min(m, n)."""
    g = lora_keys.group(sorted(entries))  # the store's order: the last of two spellings wins alike
    if g.base_layer or g.full or g.tokens or g.other:
        raise Declined("tensors other than LoRA factors")
    plan = {}
    for name in sorted(g.lora, key=module_order):
        keys = g.lora[name].keys
        if set(keys) != {"lora_A", "lora_B"}:
            raise Declined(f"{name}: not a plain linear LoRA module")
        a, b = entries[keys["lora_A"]].shape, entries[keys["lora_B"]].shape
        if len(a) != 2 or len(b) != 2 or b[1] != a[0] or not 0 < a[0] < min(b[0], a[1]):
            raise Declined(f"{name}: factor shapes the factored route does not take")
        plan[name] = keys
    return plan


def read_header(fh: BinaryIO) -> dict[str, Entry]:
    """The tensors of a safetensors file (format: an 8-byte little-endian header length, a UTF-8
    JSON header of name → dtype, shape, data_offsets, then the data): ValueError wherever the
    safetensors library (or the loader's store) would refuse the file — a header over 100 MB or
    not strict UTF-8 JSON, a repeated name, a name over :data:`~deltaspec.names.MAX_NAME`
    characters, metadata that is not text → text, a shape or offset that is not a non-negative
    integer, byte ranges that do not tile the data exactly — or a dtype is not one
    :data:`DTYPES` widens exactly."""
    size = os.fstat(fh.fileno()).st_size
    (n,) = struct.unpack("<Q", fh.read(8))
    if n > min(size - 8, MAX_HEADER):
        raise ValueError("safetensors header runs past the end of the file or is too large")
    header = json.loads(fh.read(n).decode("utf-8"), object_pairs_hook=_unique,
                        parse_constant=_no_constant)
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(_text(k) and _text(v) for k, v in meta.items()):
        raise ValueError("safetensors __metadata__ is not a mapping of text to text")
    out = {key: _entry(key, e, 8 + n) for key, e in header.items()}
    at = 8 + n
    for e in sorted(out.values(), key=lambda e: (e.start, e.end)):
        if e.start != at:
            raise ValueError("safetensors byte ranges overlap or leave a gap")
        at = e.end
    if at != size:
        raise ValueError("safetensors byte ranges do not end at the end of the file")
    return out


def _entry(key: str, e: Any, base: int) -> Entry:
    if not (_text(key) and len(key) <= MAX_NAME and isinstance(e, dict) and _text(e.get("dtype"))
            and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)
            and len(e["data_offsets"]) == 2 and all(map(_count, e["shape"] + e["data_offsets"]))):
        raise ValueError(f"tensor {key[:60]!r}: not a safetensors entry deltaspec reads here")
    dtype, shape, (start, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
    if dtype not in DTYPES or end - start != math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize:
        raise ValueError(f"tensor {key[:60]!r}: dtype {dtype} or its byte range is not readable here")
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
    raise ValueError(f"safetensors header holds {name}, which is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a name repeated in a safetensors header")
    return dict(pairs)


def read_float32(fh: BinaryIO, e: Entry) -> np.ndarray:
    """One tensor as float32, as the loader reads it (bfloat16 and float16 exactly; float64
    rounded, as ``Tensor.to(torch.float32)`` does)."""
    fh.seek(e.start)
    raw = np.frombuffer(fh.read(e.end - e.start), dtype=DTYPES[e.dtype])
    if e.dtype == "BF16":  # bfloat16 is the top half of a float32
        wide = raw.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32).reshape(e.shape)
    return raw.astype(np.float32).reshape(e.shape)


def factored_values(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """All min(m, n) singular values of B·A (B (m, R), A (R, n)), descending: QR of B and Aᵀ in
    float64, SVD of the R×R core; zeros past R.

    >>> b, a = np.array([[3.0], [0.0]]), np.array([[0.0, 2.0, 0.0]])
    >>> factored_values(b, a).tolist()
    [6.0, 0.0]
    """
    # Fortran order: LAPACK's own layout, so numpy's qr copies less (Aᵀ of a C-order A is one)
    with blas_threads(1, "numpy") if b.shape[1] <= ONE_THREAD_RANK else nullcontext():
        rb = cast(np.ndarray, np.linalg.qr(b.astype(np.float64, order="F"), mode="r"))  # R only
        ra = cast(np.ndarray, np.linalg.qr(a.astype(np.float64).T, mode="r"))
    core = rb @ ra.T  # (R, R): ΔW = Q_B · core · Q_Aᵀ
    out = np.zeros(min(b.shape[0], a.shape[1]))
    s = np.linalg.svd(core, compute_uv=False)[: out.size]
    out[: s.size] = s
    return out


def _row(fh: BinaryIO, entries: dict[str, Entry], name: str, keys: dict[str, str],
         config: dict[str, Any], opts: Options) -> dict[str, Any]:
    """One module's row (:class:`Declined` for a non-finite factor: the loader's error)."""
    a, b = read_float32(fh, entries[keys["lora_A"]]), read_float32(fh, entries[keys["lora_B"]])
    r, shape = a.shape[0], (b.shape[0], a.shape[1])  # r < min(shape): checked by _plan
    b = b * np.float32(peft_config.scale(config, name, r))  # float32, as the loader's B·s
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise Declined(f"{name}: NaN/Inf")
    values = factored_values(b, a)
    return cols.identity(name, "lora", shape, r, "factored") \
        | spectral_metrics(values, shape, opts.top_k, r)


__all__ = ["HONOURED", "Declined", "Entry", "analyze_rows", "factored_values", "read_float32", "read_header"]
