"""The two executors of one plan (deltaspec/plan.py): the numpy executor (deltaspec/engine/host.py)
and the torch executor (deltaspec/loop.py) give the same table on the plan the numpy executor was
chosen for; the plan chooses torch, with its reason, wherever numpy does not apply; the one
safetensors header reader refuses what the safetensors library refuses; a command line that
imports neither torch nor pandas when the numpy executor answers."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import factories as F
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from hubcache import offline_env
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deltaspec import columns as cols
from deltaspec import loop
from deltaspec.cli import main
from deltaspec.engine import host
from deltaspec.engine.host import factored_values
from deltaspec.errors import DeltaspecError, DeltaspecWarning
from deltaspec.loaders.header import read_float32, read_header
from deltaspec.options import Options
from deltaspec.output import Rows, render, to_records
from deltaspec.plan import NUMPY, TORCH, Request, build

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EQUAL = {  # LoraConfig keywords of adapters the numpy executor reads
    "plain": {"target_modules": LLAMA_ALL},
    "rslora": {"target_modules": LLAMA_ALL, "use_rslora": True, "lora_alpha": 16},
    "patterns": {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
                 "rank_pattern": {"layers.0.self_attn.q_proj": 2, "v_proj": 6},
                 "alpha_pattern": {r"layers\.1\..*proj": 3, "q_proj": 5}},
}
TORCH_ONLY = {  # … and those the plan gives the torch executor
    "dora": {"target_modules": ["q_proj", "v_proj"], "use_dora": True},
    "embedding": {"target_modules": ["embed_tokens", "q_proj"]},
    "modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}


def plan_of(folder, base=None, **opts):
    return build(Request((folder,), base, Options(**opts)))


def assert_parity(folder, **opts) -> None:
    """One plan, both executors: same columns, text and integers; floats to LAPACK rounding (two
    LAPACK builds: numpy's and torch's); the same σ."""
    plan = plan_of(folder, **opts)
    assert plan.executor == NUMPY, plan.reason
    a, b = host.run(plan), loop.run_plan(plan)
    fa, fb = a.frame(), b.frame()
    assert list(fa.columns) == list(fb.columns)
    assert fa["module"].tolist() == fb["module"].tolist()
    for c in fb.columns:
        if pd.api.types.is_float_dtype(fb[c]):
            np.testing.assert_allclose(fa[c].to_numpy(float), fb[c].to_numpy(float),
                                       rtol=1e-11, atol=1e-13, err_msg=c)
        else:
            assert fa[c].tolist() == fb[c].tolist(), c
    for m, s in b.sigmas.items():
        np.testing.assert_allclose(a.sigmas[m], s, rtol=1e-10, atol=1e-12 * max(s[0], 1e-300))
    assert a.notes == b.notes  # e.g. the untrained note


@pytest.mark.parametrize("variant", list(EQUAL))
def test_executors_agree(tmp_path, llama, variant):
    folder, _ = F.lora_adapter(llama[0], tmp_path / "a", **({"r": 4, "lora_alpha": 8} | EQUAL[variant]))
    assert_parity(folder)


@pytest.mark.parametrize("opts", [{"heavy_tail": True}, {"top_k": 64}, {"top_k": 3},
                                  {"merge_dtype": "float16"}])
def test_executors_agree_on_the_health_columns_and_the_k_cap(tmp_path, llama, opts):
    """α of ΔW (--alpha), noise_rank and untrained, and a top-K above a module's rank (capped at
    it with a warning) on both executors; --merge-dtype has no use without a base."""
    folder, _ = F.lora_adapter(llama[0], tmp_path / "a", **({"r": 4, "lora_alpha": 8}
                                                           | EQUAL["patterns"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cap's warning (tests/test_verdict.py checks it)
        assert_parity(folder, **opts)
        rows = host.run(plan_of(folder, **opts)).rows
    assert {"noise_rank", "untrained"} <= set(rows.columns)
    assert ("alpha" in rows.columns) == bool(opts.get("heavy_tail"))
    if opts.get("top_k") == 64:  # capped at each module's rank: every value is kept
        assert all(r["rank"] == r["rank_bound"] for r in rows.rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_stored_dtypes_are_read_alike(tmp_path, llama_lora, dtype):
    folder = tmp_path / str(dtype).removeprefix("torch.")
    folder.mkdir()
    (folder / "adapter_config.json").write_text((llama_lora[0] / "adapter_config.json").read_text())
    tensors = load_file(llama_lora[0] / "adapter_model.safetensors")
    save_file({k: v.to(dtype) for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    assert_parity(folder, top_k=3, include="self_attn")


def test_reader_against_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    want = {f"t{d}": (torch.randn(3, 5, generator=g) * 1e3).to(d)
            for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)}
    want["ints"] = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    save_file(want, tmp_path / "x.safetensors")
    with open(tmp_path / "x.safetensors", "rb") as fh, \
            safe_open(tmp_path / "x.safetensors", "pt") as st:
        entries = read_header(fh)
        assert sorted(entries) == sorted(st.keys())
        for key, t in want.items():
            assert entries[key].shape == tuple(t.shape)
            if key != "ints":
                got = read_float32(fh, entries[key])
                assert got.dtype == np.float32
                assert np.array_equal(got, t.to(torch.float32).numpy()), key


def test_factored_values_against_numpy_svd():
    rng = np.random.default_rng(1)
    b, a = rng.standard_normal((40, 5)), rng.standard_normal((5, 30))
    b[:, 4] = 1e-9 * b[:, 3]  # a nearly rank-deficient factor
    want = np.linalg.svd(b @ a, compute_uv=False)
    np.testing.assert_allclose(factored_values(b, a), want, rtol=0, atol=1e-14 * want[0])
    assert factored_values(np.zeros((6, 2)), np.ones((2, 4))).tolist() == [0.0] * 4


@pytest.mark.parametrize("variant", list(TORCH_ONLY))
def test_the_plan_gives_torch_what_numpy_does_not_read(tmp_path, llama, variant):
    folder, _ = F.peft_adapter(llama[0], tmp_path / "a", **({"r": 4} | TORCH_ONLY[variant]))
    plan = plan_of(folder)
    assert plan.executor == TORCH and plan.reason.startswith("torch executor: "), plan.reason


@pytest.mark.parametrize(("opts", "why"), [(dict(device="cuda"), "device cuda"),
                                           (dict(shard=(0, 2)), "shard")])
def test_the_plan_gives_torch_the_options_numpy_does_not_honour(llama_lora, opts, why):
    plan = plan_of(llama_lora[0], **opts)
    assert plan.executor == TORCH and why in plan.reason, plan.reason


def test_a_base_given_or_found_takes_the_torch_executor(llama, llama_lora, tmp_path):
    assert "a base" in plan_of(llama_lora[0], str(llama[1])).reason
    folder = _copy(llama_lora[0], tmp_path / "named")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path":
                                                                  str(llama[1])}))
    with pytest.warns(UserWarning, match="base: "):  # the plan decides the base once, and says so
        assert plan_of(folder).executor == TORCH
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_of(folder, discover_base=False).executor == NUMPY


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _corrupt(kind: str, folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    if kind == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "header":
        weights.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    elif kind == "nan":
        t = load_file(weights)
        key = sorted(t)[0]
        t[key] = t[key].clone()
        t[key][0, 0] = math.nan
        save_file(t, weights)
    elif kind == "moe":
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(cfg | {"lora_nums": 2}))
    elif kind == "bin":
        torch.save(load_file(weights), folder / "adapter_model.bin")
        weights.unlink()


@pytest.mark.parametrize("kind", ["truncated", "header", "moe", "bin"])
def test_files_numpy_cannot_vouch_for_take_the_torch_executor(tmp_path, llama_lora, kind):
    folder = _copy(llama_lora[0], tmp_path / kind)
    _corrupt(kind, folder)
    try:
        plan = plan_of(folder)
    except DeltaspecError:
        return  # the format detection already refused it, in the loaders' words
    assert plan.executor == TORCH, plan.reason


@pytest.mark.parametrize("kind", ["truncated", "nan"])
def test_the_cli_says_one_line_error_naming_the_file(tmp_path, llama_lora, kind):
    folder = _copy(llama_lora[0], tmp_path / kind)
    _corrupt(kind, folder)
    res = CliRunner().invoke(main, ["analyze", str(folder)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("deltaspec: error:")]
    assert len(lines) == 1 and "adapter_model.safetensors" in lines[0]


def test_rows_render_as_the_frame_does():
    rows = [{"module": 'a,"b"\nc', "layer": None, "kind": "q", "rank_bound": 3,
             "fro_norm": 1 / 3, "entropy": math.nan, "rank": 2, "top1_share": 1e-20},
            {"module": "m.1.q", "layer": 1, "kind": "q", "rank_bound": 16,
             "fro_norm": 1e16, "entropy": 0.0, "rank": 0, "top1_share": 123456.789}]
    r = Rows(rows, ["module", "layer", "kind", "rank_bound", "fro_norm", "entropy", "rank",
                    "top1_share"])
    df = cols.frame(r.rows, r.columns)
    assert r.csv() == df.to_csv(index=False)
    assert r.records() == to_records(df)
    for fmt in ("csv", "json", "table"):
        assert render(r, fmt) == render(df, fmt), fmt


def test_cli_answers_without_torch_or_pandas(llama_lora, tmp_path):
    out = tmp_path / "m.csv"
    code = ("import sys\nfrom deltaspec.cli import main\n"
            f"try:\n    main(['analyze', {str(llama_lora[0])!r}, '-o', {str(out)!r}])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))\n")
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    got = pd.read_csv(out)
    want = loop.run_plan(plan_of(llama_lora[0])).frame()
    assert got["module"].tolist() == want["module"].tolist()
    np.testing.assert_allclose(got["normalized_entropy"], want["normalized_entropy"], rtol=1e-11)


def test_cli_output_is_the_same_on_either_executor(llama_lora, tmp_path, monkeypatch):
    folder = _copy(llama_lora[0], tmp_path / "named")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path":
                                                                  "org/not-cached"}))
    offline_env(monkeypatch, tmp_path / "cache")
    numpy_run = CliRunner().invoke(main, ["analyze", str(folder), "--top-k", "3"])
    monkeypatch.setattr("deltaspec.execute.NUMPY", "none")  # every plan runs on torch
    torch_run = CliRunner().invoke(main, ["analyze", str(folder), "--top-k", "3"])
    assert numpy_run.exit_code == torch_run.exit_code == 0
    assert numpy_run.output == torch_run.output  # 4-digit table, the discovery note, the hint
    assert "org/not-cached" in numpy_run.output and "not used" in numpy_run.output


def _raw(header: dict | list, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(("header", "data"), [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),  # overlap
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),  # a gap
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12),  # trailing bytes
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),  # size ≠ shape
    ({"a": {"dtype": "X32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),  # no such dtype
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8),  # negative
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),  # negative dim
    ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8),  # float dim
    ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, b"\0" * 8),  # text dim
    ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [False, 0]}}, b""),  # a bool offset
    ({"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
     b"\0" * 8),  # metadata not text → text
    ({"__metadata__": [1], "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    ({"x" * 1025: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),  # long name
    ({"\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),  # surrogate
    ([1, 2], b""),  # not an object
])
def test_header_refuses_what_safetensors_refuses(tmp_path, header, data):
    (tmp_path / "w").write_bytes(_raw(header, data))
    with open(tmp_path / "w", "rb") as fh, pytest.raises(ValueError):
        read_header(fh)
    if len(str(header)) > 1024:
        return  # a name over MAX_NAME: the loader's store refuses it, not the library
    with pytest.raises(Exception), safe_open(tmp_path / "w", "np") as st:  # noqa: B017
        [st.get_tensor(k) for k in st.keys()]  # noqa: SIM118  (the oracle refuses it too)


def test_header_refuses_a_repeated_name(tmp_path):
    text = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
           b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    (tmp_path / "w").write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)
    with open(tmp_path / "w", "rb") as fh, pytest.raises(ValueError, match="repeated"):
        read_header(fh)


@pytest.mark.parametrize("text", [
    b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}',
    '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'.encode("utf-16"),
])
def test_header_is_strict_utf8_json(tmp_path, text):
    (tmp_path / "w").write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)
    with open(tmp_path / "w", "rb") as fh, pytest.raises(ValueError):
        read_header(fh)


def test_mixed_dtypes_group_in_the_stores_name_order(tmp_path, llama_lora):
    """safetensors writes data by dtype, then name; the store lists names sorted: a part saved
    under two spellings resolves the same way on both executors (the last name sorted wins)."""
    folder = _copy(llama_lora[0], tmp_path / "mixed")
    t = load_file(folder / "adapter_model.safetensors")
    key = sorted(k for k in t if k.endswith("lora_A.weight"))[0]
    t[key.removeprefix("base_model.model.")] = (3 * t[key]).double()  # an F64 second spelling
    save_file(t, folder / "adapter_model.safetensors")
    assert_parity(folder)


def test_zero_update_subfolder_and_conv1d_adapters(tmp_path, llama, gpt2):
    zero, _ = F.lora_adapter(llama[0], tmp_path / "zero", r=4, init_lora_weights=True,
                             target_modules=["q_proj", "v_proj"])  # B = 0: PEFT's default start
    named, _ = F.peft_adapter(llama[0], tmp_path / "named", r=4, adapter_name="mine",
                              target_modules=["q_proj"])
    assert (named / "mine" / "adapter_config.json").is_file()  # saved one folder down
    conv, _ = F.lora_adapter(gpt2[0], tmp_path / "conv", r=4, target_modules=["c_attn", "c_fc"],
                             fan_in_fan_out=True)
    for folder in (zero, named, conv):
        assert_parity(folder)
    result = host.run(plan_of(zero))
    assert all(r["fro_norm"] == 0.0 and r["untrained"] == 1 for r in result.rows.rows)
    assert result.notes == [f"{len(result.rows.rows)} of {len(result.rows.rows)} modules have B = 0: "
                            "this adapter never trained there"]


def test_a_full_rank_module_takes_the_torch_executor(tmp_path, llama):
    folder, _ = F.lora_adapter(llama[0], tmp_path / "a", r=32, target_modules=["q_proj"])
    plan = plan_of(folder)
    assert plan.executor == TORCH and "factor shapes" in plan.reason  # r = min(m, n): dense
    assert {r["route"] for r in loop.run_plan(plan).rows.rows} == {"dense"}


def test_kind_means_are_pandas_groupby_means():
    from deltaspec.output import kind_means

    rng = np.random.default_rng(3)
    kinds = ["q_proj", "v_proj", "up_proj"]
    rows = [{"module": f"m.{i}.{kinds[i % 3]}", "kind": kinds[i % 3], "rank_bound": int(i % 5 + 1),
             "fro_norm": float(rng.random()), "intruders": math.nan if i % 2 else float(i)}
            for i in range(11)]
    df = cols.frame(rows, list(rows[0]))
    text = kind_means(list(df.columns), to_records(df)).splitlines()
    want = df.groupby("kind")[["rank_bound", "fro_norm", "intruders"]].mean()
    assert text[0].split() == ["kind", "modules", "rank_bound", "fro_norm", "intruders"]
    for line, (kind, means) in zip(text[1:], want.iterrows(), strict=True):
        got = line.split()
        assert got[0] == kind and int(got[1]) == int((df["kind"] == kind).sum())
        np.testing.assert_allclose([float(x) for x in got[2:]], means.to_numpy(float), rtol=1e-3)


def test_a_named_base_to_download_is_never_downloaded(llama_lora, tmp_path, monkeypatch):
    """Discovery never downloads: the plan keeps the numpy executor, with a note saying how to
    fetch the base."""
    from deltaspec.loaders.sources import hub

    folder = _copy(llama_lora[0], tmp_path / "named")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path":
                                                                  "org/on-the-hub"}))
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(hub, "cached_folder", lambda repo, revision=None: None)
    monkeypatch.setattr(hub, "hub_folder", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.warns(DeltaspecWarning, match="does not download: pass --base org/on-the-hub"):
        assert plan_of(folder).executor == NUMPY


def test_blas_threads_sets_and_restores():
    from deltaspec.engine.blas import blas_threads, openblas

    found = openblas("numpy")
    if found is None:
        pytest.skip("numpy is not built on OpenBLAS here")
    lib, suffix = found
    get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}")
    before = get()
    with blas_threads(1, "numpy"):
        assert get() == 1
    assert get() == before


def test_table_text(llama_lora):
    """The table format, pandas-free on both routes: right-aligned columns, '–' for undefined,
    a one-line header over the per-kind means."""
    rows = [{"module": "model.layers.0.self_attn.q_proj", "kind": "q_proj", "shape": "32×32",
             "rank_bound": 4, "fro_norm": 1.5, "relative_norm": math.nan},
            {"module": "l.1.q_proj", "kind": "q_proj", "shape": "32×32", "rank_bound": 2,
             "fro_norm": 0.25, "relative_norm": 0.5}]
    text = render(Rows(rows, list(rows[0])), "table").splitlines()
    assert text[0].split() == ["module", "shape", "rank_bound", "fro_norm", "relative_norm"]
    assert text[1].split()[-1] == "–" and text[2].endswith("0.5")
    assert len({len(line) for line in text[:3]}) == 1  # one width per column
    assert text[4:] == ["mean per module kind:",
                        "kind   modules rank_bound fro_norm relative_norm",
                        "q_proj       2          3    0.875           0.5"]
