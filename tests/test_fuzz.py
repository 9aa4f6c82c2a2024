"""Fuzzing the CLI in-process with mutated genuine files (hypothesis).

Genuine files — a PEFT adapter's safetensors header and ``adapter_config.json``, a sharded
checkpoint's index, a baseline, a rules file — are mutated (byte flips, truncation, deep nesting,
huge numbers, odd names) and run through ``deltaspec analyze`` / ``check``. The property: exit 0
(or 1, a regression, for ``check``), or exit 2 with exactly one line on stderr that names a file
of the case or a tensor; never a traceback, never a file left in the output folder, and within a
time bound. ``DELTASPEC_FUZZ_EXAMPLES`` runs more examples (default 30, well under a minute).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltaspec.cli import main

EXAMPLES = int(os.environ.get("DELTASPEC_FUZZ_EXAMPLES", "30"))
TIME_BOUND = 20.0  # seconds per example on a busy 2-core CPU (each takes < 1 s alone)
ODD = ["\n", "\x00", "../", "/etc/passwd", "x" * 5000, "\u2028", "\x1b[31m", "é" * 200, "", "[", "{"]
HUGE = ["1e999", "-1e999", "9" * 400, "NaN", "Infinity", "0", "-1", "1e-400", "true", "null", "[]"]


@pytest.fixture(scope="module")
def genuine(llama, llama_lora, llama_full, tmp_path_factory):
    """Paths of the genuine inputs every example starts from."""
    adapter, _ = llama_lora
    root = tmp_path_factory.mktemp("fuzz")
    baseline = root / "baseline.json"
    res = CliRunner().invoke(main, ["snapshot", str(adapter), "--out", str(baseline), "-q",
                                    "--k", "2"])
    assert res.exit_code == 0, res.output
    sharded = shutil.copytree(llama_full, root / "sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(sharded / "model-00001-of-00001.safetensors"), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {k: "model-00001-of-00001.safetensors"
                                                       for k in keys}}))
    rules = root / "rules.toml"
    rules.write_text('ignore = ["lm_head"]\nfail_on_new = false\n[defaults]\n'
                     'normalized_entropy = {drop = 0.05}\n[kinds.q_proj]\nfro_norm = {rel = 0.5}\n')
    return {"adapter": adapter, "base": llama[1], "sharded": sharded, "baseline": baseline,
            "rules": rules}


def _mutate(data: bytes, ops: list[tuple[str, int, int, str]], text: bool) -> bytes:
    """Apply mutations: (kind, position, amount, payload) with positions taken modulo the size."""
    for kind, pos, amount, payload in ops:
        n = max(len(data), 1)
        i = pos % n
        if kind == "flip":
            data = data[:i] + bytes([data[i] ^ (1 << (amount % 8))]) + data[i + 1:] if data else data
        elif kind == "truncate":
            data = data[:i]
        elif kind == "nest":
            depth = 10 ** (1 + amount % 5)
            data = data[:i] + (b"[" * depth if amount % 2 else b'{"a":' * depth) + data[i:]
        elif kind == "number" and text:
            data = re.sub(rb"-?\d+(\.\d+)?(e-?\d+)?", payload.encode(), data, count=1 + amount % 3)
        elif kind == "name" and text:
            raw = payload.encode("utf-8", "surrogatepass")
            quoted = json.dumps(payload)[1:-1].encode() if amount % 2 else raw
            data = data[:i] + quoted + data[i:]
    return data


MUTATION = st.tuples(st.sampled_from(["flip", "truncate", "nest", "number", "name"]),
                     st.integers(0, 1 << 20), st.integers(0, 64),
                     st.sampled_from(ODD + HUGE))
TARGETS = ["adapter_header", "adapter_config", "index", "baseline", "rules"]


def _case(genuine: dict, tmp: Path, target: str) -> tuple[list[str], Path]:
    """(argv, the file to mutate) for one example, in a fresh copy under ``tmp``."""
    out = ["--format", "json", "--output", str(tmp / "out" / "result.json"), "-q"]
    if target in ("adapter_header", "adapter_config"):
        d = shutil.copytree(genuine["adapter"], tmp / "adapter")
        name = "adapter_model.safetensors" if target == "adapter_header" else "adapter_config.json"
        return ["analyze", str(d), *out], d / name
    if target == "index":
        d = tmp / "sharded"
        d.mkdir()
        for f in genuine["sharded"].iterdir():  # the shard itself is linked, the index copied
            (d / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, d / f.name)
        return ["analyze", str(d), "--base", str(genuine["base"]), *out], \
            d / "model.safetensors.index.json"
    f = shutil.copy(genuine[target], tmp / Path(genuine[target]).name)
    argv = ["check", str(genuine["adapter"]), "-b", str(tmp / "baseline.json")
            if target == "baseline" else str(genuine["baseline"]), "--format", "json",
            "--output", str(tmp / "out" / "result.json"), "-q"]
    if target == "rules":
        argv += ["--rules", str(f)]
    return argv, Path(f)


def _mutate_file(f: Path, ops, target: str) -> None:
    raw = f.read_bytes()
    if target == "adapter_header":  # mutate the JSON header only; keep the length prefix honest
        (n,) = struct.unpack("<Q", raw[:8])
        header = _mutate(raw[8:8 + n], ops, text=True)
        f.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    else:
        f.write_bytes(_mutate(raw, ops, text=True))


def _names(genuine: dict) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(Path(genuine["adapter"]) / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    return keys | {k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in keys}


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(target=st.sampled_from(TARGETS), ops=st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_genuine_files_never_crash(genuine, target, ops):
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "out").mkdir()
        argv, victim = _case(genuine, tmp, target)
        _mutate_file(victim, ops, target)
        start = time.monotonic()
        res = CliRunner().invoke(main, argv, env={"GITHUB_ACTIONS": "false"})
        took = time.monotonic() - start
        assert res.exception is None or isinstance(res.exception, SystemExit), \
            (target, ops, repr(res.exception))
        assert "Traceback" not in res.output
        assert took < TIME_BOUND, (target, ops, took)
        ok = {0, 1} if argv[0] == "check" else {0}
        if res.exit_code in ok:
            assert [p.name for p in (tmp / "out").iterdir()] == ["result.json"]
            return
        assert res.exit_code == 2, (target, ops, res.exit_code, res.output)
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("deltaspec: error: "), (target, ops, res.stderr)
        named = [str(tmp), str(genuine["adapter"]), str(genuine["sharded"]), str(genuine["base"]),
                 str(genuine["baseline"])]
        assert any(p in lines[0] for p in named) or any(k in lines[0] for k in _names(genuine)), \
            (target, ops, lines[0])
        assert list((tmp / "out").iterdir()) == []
