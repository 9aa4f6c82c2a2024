"""Fuzzing every loader's config schema and the safetensors header (hypothesis).

Each example writes a small adapter of one format whose config takes hostile values for the keys
that format's schema declares (huge and negative integers, NaN, strings, lists, nulls), or whose
safetensors header is rewritten (dtypes, shapes, offsets, metadata), then loads it and multiplies
every delta out. The property: the update is read, or a :class:`DeltaspecError` of one line is
raised — never another exception, never a hang. Hostile headers also go through the torch-free
reader (``deltaspec/loaders/header.py``: it refuses whatever the ``safetensors`` library refuses)
and the plan's numpy executor. ``DELTASPEC_FUZZ_EXAMPLES`` runs more examples
(default 30 each, a few seconds).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import deltaspec
from deltaspec.errors import DeltaspecError
from deltaspec.execute import execute
from deltaspec.loaders.header import HeaderError, read_header
from deltaspec.loaders.multi import lora_moe, mixlora, multilora
from deltaspec.loaders.peft import adalora, boft, fourierft, ia3, loha, oft, vera
from deltaspec.loaders.peft import config as lora_config
from deltaspec.options import Options
from deltaspec.plan import Request, build

EXAMPLES = int(os.environ.get("DELTASPEC_FUZZ_EXAMPLES", "30"))
TIME_BOUND = 20.0  # seconds per example on a busy 2-core CPU
Q = "base_model.model.model.layers.0.self_attn.q_proj"  # the tiny Llama's (32, 32) q_proj


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


# format → (peft_type or None, its schema, tensors of a small valid adapter, config file name)
FORMATS = {
    "lora": ("LORA", lora_config.SCHEMA, {f"{Q}.lora_A.weight": _r(2, 32), f"{Q}.lora_B.weight": _r(32, 2)}),
    "adalora": ("ADALORA", adalora.SCHEMA, {f"{Q}.lora_A": _r(2, 32), f"{Q}.lora_B": _r(32, 2),
                                            f"{Q}.lora_E": _r(2, 1)}),
    "vera": ("VERA", vera.SCHEMA, {f"{Q}.vera_lambda_b": _r(32), f"{Q}.vera_lambda_d": _r(4),
                                   "base_model.vera_A": _r(4, 32), "base_model.vera_B": _r(32, 4)}),
    "fourierft": ("FOURIERFT", fourierft.SCHEMA, {f"{Q}.fourierft_spectrum": _r(5)}),
    "loha": ("LOHA", loha.SCHEMA, {f"{Q}.hada_w{i}_{s}": _r(32, 2) if s == "a" else _r(2, 32)
                                   for i in (1, 2) for s in "ab"}),
    "lokr": ("LOKR", loha.SCHEMA, {f"{Q}.lokr_w1": _r(4, 4), f"{Q}.lokr_w2": _r(8, 8)}),
    "ia3": ("IA3", ia3.SCHEMA, {f"{Q}.ia3_l": _r(32, 1)}),
    "oft": ("OFT", oft.SCHEMA, {f"{Q}.oft_R": _r(8, 6) * 0.1}),
    "boft": ("BOFT", boft.SCHEMA, {f"{Q}.boft_R": _r(1, 8, 4, 4) * 0.1, f"{Q}.boft_s": _r(32, 1)}),
    "mixlora": ("MIXLORA", mixlora.SCHEMA, {
        "mixlora.layers.0.self_attn.q_proj.lora_A.weight": _r(2, 32),
        "mixlora.layers.0.self_attn.q_proj.lora_B.weight": _r(32, 2),
        "mixlora.layers.0.experts.0.up_proj.lora_A.weight": _r(2, 32),
        "mixlora.layers.0.experts.0.up_proj.lora_B.weight": _r(48, 2)}),
    "lora_moe": ("LORA", lora_moe.SCHEMA, {f"{Q}.lora_A.weight": _r(2, 32),
                                           f"{Q}.lora_B0.weight": _r(32, 2)}),
    "multilora": (None, multilora.SCHEMA, {"model.layers.0.self_attn.q_proj.lora_A": _r(2, 2, 32),
                                           "model.layers.0.self_attn.q_proj.lora_B": _r(2, 32, 2),
                                           "model.layers.0.self_attn.q_proj.lora_scaling": _r(2)}),
}
VALID = {"lora_moe": {"lora_nums": 1, "lora_alpha": 8}, "mixlora": {"lora_alpha": 8, "num_experts": 1},
         "multilora": {"lora_alpha": 4, "r": 2}, "vera": {"r": 4}}

HOSTILE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, -1, 2**63, 2**64, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.booleans(), st.none(),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 9), max_size=2),
)


def _write(folder: Path, fmt: str, config: dict) -> None:
    kind, _, tensors = FORMATS[fmt]
    name = "multilora" if kind is None else "adapter"
    (folder / f"{name}_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}_model.safetensors"))


def _exercise(folder: Path, base: Path) -> None:
    """Load and multiply every delta out: read, or one line of DeltaspecError."""
    t0 = time.perf_counter()
    try:
        for d in deltaspec.load(folder, base=base).values():
            d.dense(torch.float64)
    except DeltaspecError as exc:
        assert "\n" not in str(exc)
    assert time.perf_counter() - t0 < TIME_BOUND


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), fmt=st.sampled_from(sorted(FORMATS)))
def test_every_schema_key_with_hostile_values(llama, data, fmt):
    kind, schema, _ = FORMATS[fmt]
    keys = data.draw(st.lists(st.sampled_from(sorted(schema)), min_size=1, max_size=3, unique=True))
    config = {"peft_type": kind} if kind else {}
    config |= VALID.get(fmt, {}) | {k: data.draw(HOSTILE, label=k) for k in keys}
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), fmt, config)
        _exercise(Path(tmp), llama[1])


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


FIELD = st.sampled_from(["dtype", "shape", "data_offsets"])
VALUES = st.one_of(HOSTILE, st.lists(st.integers(-(2**66), 2**66), max_size=4),
                   st.sampled_from(["F16", "BF16", "I8", "BOOL", "F8_E4M3", "C64", "U64", "F64"]))


def _exercise_torch_free(folder: Path) -> None:
    """The one header reader refuses what the safetensors library refuses; the plan and the
    executor it chooses (numpy for a header it reads) give a table or one line of DeltaspecError."""
    weights = folder / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), "np") as st:
            [st.get_tensor(k) for k in st.keys()]  # noqa: SIM118
        library_reads = True
    except Exception:  # noqa: BLE001  (the oracle: whatever it raises, it refused the file)
        library_reads = False
    try:
        with open(weights, "rb") as fh:
            read_header(fh)
        we_read = True
    except HeaderError as exc:
        assert "\n" not in str(exc)
        we_read = False
    assert library_reads or not we_read, "header.py read a file the safetensors library refuses"
    t0 = time.perf_counter()
    try:
        execute(build(Request((str(folder),), None, Options(discover_base=False))))
    except DeltaspecError as exc:
        assert "\n" not in str(exc)
    assert time.perf_counter() - t0 < TIME_BOUND


@pytest.mark.parametrize("seed_route", ["api", "torch-free"])
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from([f"{Q}.lora_A.weight", f"{Q}.lora_B.weight",
                                                  "__metadata__"]), FIELD, VALUES),
                      min_size=1, max_size=3))
def test_safetensors_headers_with_hostile_entries(llama, seed_route, edits):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write(folder, "lora", {"peft_type": "LORA", "r": 2, "lora_alpha": 4})
        weights = folder / "adapter_model.safetensors"
        header, body = _header(weights)
        for key, field, value in edits:
            entry = header.setdefault(key, {})
            if isinstance(entry, dict):
                entry[field] = value
        text = json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(text)) + text + body)
        if seed_route == "torch-free":
            _exercise_torch_free(folder)
        else:
            _exercise(folder, llama[1])
