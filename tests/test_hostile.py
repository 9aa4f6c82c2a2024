"""Hostile and edge-case inputs, one table row each, through the CLI (in-process) and the API.

Every bad case: exit 2, exactly one line on stderr that names the file or tensor, no traceback,
nothing left in the output folder, within a time bound; the API raises a DeltaspecError whose
message is one line. Every valid layout (Hugging Face cache symlinks, float8, a BOM, a
catastrophic-but-valid pattern key, a 250-character output name) reads.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import factories as F
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import deltaspec
from deltaspec.cli import main
from deltaspec.errors import DeltaspecError

CFG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
TIME_BOUND = 20.0  # seconds per case on a busy 2-core CPU (each takes well under 1 s alone)


@dataclass
class Case:
    argv: list[str]
    needle: str  # what the one error line must contain (the file or tensor)
    api: Callable[[], object] | None = None  # the same input through the library
    setup: Callable[[pytest.MonkeyPatch], None] | None = None
    gone: list[Path] = field(default_factory=list)  # paths that must not exist afterwards


@pytest.fixture(scope="module")
def ctx(llama, llama_lora, llama_full, tmp_path_factory):
    folder, _ = llama_lora
    baseline = tmp_path_factory.mktemp("hostile_snap") / "baseline.json"
    res = CliRunner().invoke(main, ["snapshot", str(folder), "--out", str(baseline), "-q"])
    assert res.exit_code == 0, res.output
    return {"adapter": folder, "base": llama[1], "full": llama_full, "baseline": baseline}


# ---- builders -------------------------------------------------------------------------------

def _copy(ctx, tmp: Path, name: str = "a") -> Path:
    return shutil.copytree(ctx["adapter"], tmp / name)


def analyze_case(d: Path, needle: str, *extra: str) -> Case:
    base = extra[extra.index("--base") + 1] if "--base" in extra else None
    return Case(["analyze", str(d), *extra], needle,
                lambda: deltaspec.analyze(d, base=base, intruders=False))


def cfg_text(text: str | bytes) -> Callable:
    def build(tmp: Path, ctx) -> Case:
        d = _copy(ctx, tmp)
        (d / CFG).write_bytes(text if isinstance(text, bytes) else text.encode())
        return analyze_case(d, CFG)
    return build


def cfg_edit(**changes) -> Callable:
    def build(tmp: Path, ctx) -> Case:
        d = _copy(ctx, tmp)
        cfg = json.loads((d / CFG).read_text()) | changes
        (d / CFG).write_text(json.dumps(cfg))
        return analyze_case(d, CFG)
    return build


def tensors_edit(edit: Callable[[dict], dict], needle: str) -> Callable:
    def build(tmp: Path, ctx) -> Case:
        d = _copy(ctx, tmp)
        tensors = edit(load_file(str(d / WEIGHTS)))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / WEIGHTS))
        return analyze_case(d, needle)
    return build


def raw_weights(data: bytes) -> Callable:
    def build(tmp: Path, ctx) -> Case:
        d = _copy(ctx, tmp)
        (d / WEIGHTS).write_bytes(data)
        return analyze_case(d, WEIGHTS)
    return build


def _header(meta: dict, data: bytes = b"") -> bytes:
    h = json.dumps(meta).encode()
    return struct.pack("<Q", len(h)) + h + data


def _sharded(tmp: Path, ctx) -> tuple[Path, dict]:
    d = shutil.copytree(ctx["full"], tmp / "ft")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    keys = load_file(str(d / "model-00001-of-00001.safetensors")).keys()
    return d, {k: "model-00001-of-00001.safetensors" for k in keys}


def index_edit(edit: Callable[[dict], object] | str) -> Callable:
    def build(tmp: Path, ctx) -> Case:
        d, weight_map = _sharded(tmp, ctx)
        index = d / "model.safetensors.index.json"
        if isinstance(edit, str):
            index.write_text(edit)
        else:
            index.write_text(json.dumps(edit(weight_map)))
        return analyze_case(d, "model.safetensors.index.json", "--base", str(ctx["base"]))
    return build


def _shard(name: str) -> Callable[[dict], dict]:
    return lambda wm: {"weight_map": wm | {"model.layers.0.mlp.up_proj.weight": name}}


def check_case(what: str, text: str | bytes, suffix: str = "") -> Callable:
    """``check`` with a hostile baseline (``what="baseline"``) or rules file."""
    def build(tmp: Path, ctx) -> Case:
        f = tmp / (f"{what}{suffix or '.json'}")
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        baseline = f if what == "baseline" else ctx["baseline"]
        argv = ["check", str(ctx["adapter"]), "-b", str(baseline)]
        if what == "rules":
            argv += ["--rules", str(f)]
            from deltaspec.gate.rules import load_rules

            return Case(argv, f.name, lambda: load_rules(f))
        from deltaspec.gate.snapshot import read_baseline

        return Case(argv, f.name, lambda: read_baseline(f))
    return build


def given_file(what: str, path: str) -> Callable:
    """``check`` with a baseline/rules argument that is not a file one can read."""
    def build(tmp: Path, ctx) -> Case:
        if what == "baseline":
            return Case(["check", str(ctx["adapter"]), "-b", path], path)
        return Case(["check", str(ctx["adapter"]), "-b", str(ctx["baseline"]), "--rules", path],
                    path)
    return build


def output_case(target: Callable[[Path], str], needle: str | None = None,
                fail: int | None = None) -> Callable:
    """``analyze --output TARGET`` that cannot be written (``fail``: errno raised while writing)."""
    def build(tmp: Path, ctx) -> Case:
        out = target(tmp)
        setup = None
        if fail is not None:
            def setup(mp: pytest.MonkeyPatch, code: int = fail) -> None:
                def full(self, *a, **k):
                    raise OSError(code, os.strerror(code))
                mp.setattr(pathlib.Path, "write_text", full)
        return Case(["analyze", str(ctx["adapter"]), "--format", "json", "--output", out],
                    needle or out[:40], setup=setup)
    return build


def junit_case(tmp: Path, ctx) -> Case:
    d = _copy(ctx, tmp)
    (d / WEIGHTS).write_bytes(b"garbage")
    return Case(["check", str(d), "-b", str(ctx["baseline"]), "--junit", str(tmp / "reports" / "x.xml")],
                WEIGHTS, gone=[tmp / "reports"])


def long_arg(flag: str) -> Callable:
    def build(tmp: Path, ctx) -> Case:
        p = str(tmp / ("x" * 5000))
        if flag == "--base":
            return analyze_case(ctx["full"], "xxxx", "--base", p)
        return analyze_case(Path(p), "xxxx")
    return build


def multilora_case(n: int = 2, r: int = 2, config: dict | None = None, needle: str = "lora_A") -> Callable:
    def build(tmp: Path, ctx) -> Case:
        d = tmp / "ml"
        F.multilora_folder(d, {"m.q": (6, 5)}, n=n, r=r)
        if config is not None:
            cfg = json.loads((d / "multilora_config.json").read_text()) | config
            cfg = {k: v for k, v in cfg.items() if v is not None}  # None: the key left out
            (d / "multilora_config.json").write_text(json.dumps(cfg))
        return analyze_case(d, needle)
    return build


def legacy_bin_huge(tmp: Path, ctx) -> Case:
    d = tmp / "ft"
    d.mkdir()
    torch.save({"w": torch.ones(4, 4)}, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    raw = (d / "pytorch_model.bin").read_bytes()
    i = raw.index(b"cpuq")
    assert raw[i + 5: i + 7] == b"K\x10"  # "cpuq\x06" then numel 16 as a BININT1
    (d / "pytorch_model.bin").write_bytes(raw[:i + 5] + b"\x8a\x05" + (2**38).to_bytes(5, "little")
                                          + raw[i + 7:])
    return analyze_case(d, "pytorch_model.bin", "--base", str(ctx["base"]))


def unsafe_pickle(tmp: Path, ctx) -> Case:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp / "pwned"),))
    d = tmp / "ft"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    return Case(["analyze", str(d), "--base", str(ctx["base"])], "pytorch_model.bin",
                gone=[tmp / "pwned"])


def newline_path(tmp: Path, ctx) -> Case:
    d = shutil.copytree(ctx["adapter"], tmp / "bad\nname")
    (d / WEIGHTS).write_bytes(b"\x00" * 7)
    return analyze_case(d, "bad\\nname")


def spectrum_case(x: Callable[[], torch.Tensor], needle: str) -> Callable:
    def build(tmp: Path, ctx) -> Case:
        return Case([], needle, lambda: deltaspec.spectrum(x()))
    return build


def _rank0(t: dict) -> dict:
    return t | {A_KEY: torch.zeros(0, t[A_KEY].shape[1]), B_KEY: torch.zeros(t[B_KEY].shape[0], 0)}


def _renamed(t: dict, new: str, b: torch.Tensor | None = None) -> dict:
    """``t`` with the q_proj module of layer 0 renamed ``new`` (and its lora_B replaced)."""
    b_t, a_t = t.pop(B_KEY), t.pop(A_KEY)
    return t | {B_KEY.replace("q_proj", new): b_t if b is None else b,
                A_KEY.replace("q_proj", new): a_t}


def _nan(t: dict) -> torch.Tensor:
    bad = t[B_KEY].clone()
    bad[0, 0] = float("nan")
    return bad


DEEP = 100_000
HOSTILE: dict[str, Callable] = {
    "config_deep_list": cfg_text("[" * DEEP),
    "config_deep_object": cfg_text('{"a":' * DEEP),
    "config_deep_just_over_limit": cfg_text('{"peft_type": "LORA", "x": ' + "[" * 65 + "]" * 65 + "}"),
    "config_alpha_1e999": cfg_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 1e999}'),
    "config_alpha_nan": cfg_text('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'),
    "config_alpha_infinity": cfg_text('{"peft_type": "LORA", "r": 4, "lora_alpha": -Infinity}'),
    "config_r_30_digits": cfg_text('{"peft_type": "LORA", "r": ' + "9" * 30 + "}"),
    "config_r_5000_digits": cfg_text('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}"),
    "config_top_level_list": cfg_text('[{"peft_type": "LORA"}]'),
    "config_top_level_string": cfg_text('"LORA"'),
    "config_invalid_utf8": cfg_text(b'{"peft_type": "LORA", "x": "\xff\xfe"}'),
    "config_utf16": cfg_text('{"peft_type": "LORA"}'.encode("utf-16")),
    "config_empty": cfg_text(""),
    "config_truncated": cfg_text('{"peft_type": "LORA", "r": 4,'),
    "config_nul_bytes": cfg_text(b"\x00" * 64),
    "config_r_zero": cfg_edit(r=0),
    "config_r_negative": cfg_edit(r=-4),
    "config_r_float": cfg_edit(r=4.5),
    "config_r_bool": cfg_edit(r=True),
    "config_r_string": cfg_edit(r="4"),
    "config_alpha_string": cfg_edit(lora_alpha="eight"),
    "config_alpha_list": cfg_edit(lora_alpha=[8]),
    "config_alpha_null": cfg_edit(lora_alpha=None),
    "config_rank_pattern_zero": cfg_edit(rank_pattern={"q_proj": 0}),
    "config_rank_pattern_float": cfg_edit(rank_pattern={"q_proj": 2.5}),
    "config_rank_pattern_list": cfg_edit(rank_pattern=["q_proj"]),
    "config_alpha_pattern_string": cfg_edit(alpha_pattern={"q_proj": "x"}),
    "config_pattern_invalid_regex": cfg_edit(rank_pattern={"(": 4}),
    "config_pattern_backref_nested": cfg_edit(alpha_pattern={r"((a)+\2)+x": 4}),
    "config_pattern_lookahead_nested": cfg_edit(alpha_pattern={r"((?=a)a+)+x": 4}),
    "config_pattern_huge_repeat": cfg_edit(alpha_pattern={"(a{1000}){1000}": 4}),
    "config_peft_type_list": cfg_edit(peft_type=["LORA"]),
    "config_is_a_folder": lambda tmp, ctx: _config_folder(tmp, ctx),
    "weights_truncated_header": raw_weights(b"\x10\x00\x00"),
    "weights_huge_header_length": raw_weights(struct.pack("<Q", 2**60) + b"{}"),
    "weights_header_length_past_end": raw_weights(struct.pack("<Q", 4096) + b"{}"),
    "weights_shape_beyond_file": raw_weights(_header(
        {A_KEY: {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 16]}}, b"\0" * 16)),
    "weights_offsets_beyond_file": raw_weights(_header(
        {A_KEY: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 2**40]}}, b"\0" * 16)),
    "weights_negative_shape": raw_weights(_header(
        {A_KEY: {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, b"\0" * 16)),
    "weights_unknown_dtype": raw_weights(_header(
        {A_KEY: {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, b"\0" * 32)),
    "weights_deep_header": raw_weights(struct.pack("<Q", 20000) + b"[" * 20000),
    "weights_header_not_utf8": raw_weights(struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc"),
    "weights_complex64": tensors_edit(lambda t: t | {A_KEY: t[A_KEY].to(torch.complex64)}, "complex64"),
    "weights_int32": tensors_edit(lambda t: t | {A_KEY: t[A_KEY].to(torch.int32)}, "int32"),
    "weights_bool": tensors_edit(lambda t: t | {B_KEY: t[B_KEY] > 0}, "bool"),
    "weights_rank_zero": tensors_edit(_rank0, "lora_A"),
    "weights_empty_in_dim": tensors_edit(lambda t: t | {A_KEY: torch.zeros(4, 0)}, "q_proj"),
    "weights_nan_in_cr_name": tensors_edit(lambda t: _renamed(t, "q\rproj", _nan(t)), "q\\rproj"),
    "weights_ansi_name_mismatch": tensors_edit(lambda t: _renamed(t, "q\x1b[31m\u2028", t[B_KEY][:, :3]),
                                               "q\\x1b[31m\\u2028"),
    "weights_inf_fp16": tensors_edit(lambda t: t | {B_KEY: torch.full_like(t[B_KEY], 7e4).half()}, B_KEY),
    "weights_a_b_mismatch": tensors_edit(lambda t: t | {A_KEY: t[A_KEY][:3]}, "q_proj"),
    "weights_1d_lora_a": tensors_edit(lambda t: t | {A_KEY: t[A_KEY].flatten()}, "q_proj"),
    "weights_long_tensor_name": tensors_edit(lambda t: t | {"x" * 5000: torch.ones(2)}, WEIGHTS),
    "weights_only_unknown_tensors": tensors_edit(lambda t: {"foo.bar": torch.ones(2)}, "foo.bar"),
    "weights_garbage": raw_weights(os.urandom(4096)),
    "weights_zero_bytes": raw_weights(b""),
    "index_deep": index_edit('{"weight_map":' + "[" * DEEP),
    "index_top_level_list": index_edit("[]"),
    "index_weight_map_list": index_edit(lambda wm: {"weight_map": list(wm)}),
    "index_weight_map_missing": index_edit(lambda wm: {"metadata": {}}),
    "index_shard_nul": index_edit(_shard("model\x00.safetensors")),
    "index_shard_5000_chars": index_edit(_shard("m" * 5000 + ".safetensors")),
    "index_shard_component_300_bytes": index_edit(_shard("é" * 150 + ".safetensors")),
    "index_shard_absolute": index_edit(_shard("/etc/passwd")),
    "index_shard_dotdot": index_edit(_shard("../x.safetensors")),
    "index_shard_dotdot_inside": index_edit(_shard("sub/../../x.safetensors")),
    "index_shard_backslash_dotdot": index_edit(_shard("..\\x.safetensors")),
    "index_shard_windows_drive": index_edit(_shard("C:\\x.safetensors")),
    "index_shard_not_string": index_edit(_shard(7)),  # type: ignore[arg-type]
    "index_shard_empty": index_edit(_shard("")),
    "index_shard_missing": index_edit(_shard("model-00002-of-00002.safetensors")),
    "index_shard_is_folder": index_edit(_shard(".")),
    "index_tensor_name_5000": index_edit(lambda wm: {"weight_map": wm | {"k" * 5000: "x"}}),
    "index_number_1e999": index_edit('{"metadata": {"total_size": 1e999}, "weight_map": {}}'),
    "multilora_n_zero": multilora_case(n=0, config={"n": None}),
    "multilora_r_zero_config": multilora_case(config={"r": 0}, needle="multilora_config.json"),
    "multilora_alpha_bool": multilora_case(config={"lora_alpha": True}, needle="multilora_config.json"),
    "multilora_deep_config": lambda tmp, ctx: _ml_text(tmp, "[" * DEEP),
    "bin_legacy_declares_256_gib": legacy_bin_huge,
    "bin_unsafe_pickle": unsafe_pickle,
    "path_5000_chars": long_arg("path"),
    "base_5000_chars": long_arg("--base"),
    "path_with_newline": newline_path,
    "output_is_a_folder": output_case(lambda tmp: str(tmp)),
    "output_under_proc": output_case(lambda tmp: "/proc/deltaspec-test/out.json", "/proc"),
    "output_proc_file": output_case(lambda tmp: "/proc/self/status", "/proc/self/status"),
    "output_name_300_chars": output_case(lambda tmp: str(tmp / ("o" * 300 + ".json")), "ooo"),
    "output_missing_folder": output_case(lambda tmp: str(tmp / "nope" / "o.json"), "nope"),
    "output_disk_full": output_case(lambda tmp: str(tmp / "o.json"), "o.json", errno.ENOSPC),
    "output_file_too_large": output_case(lambda tmp: str(tmp / "o.json"), "o.json", errno.EFBIG),
    "output_read_only_fs": output_case(lambda tmp: str(tmp / "o.json"), "o.json", errno.EROFS),
    "output_dev_full": output_case(lambda tmp: "/dev/full", "/dev/full"),
    "output_fifo_without_reader": output_case(lambda tmp: _fifo(tmp), "fifo"),
    "junit_under_proc": lambda tmp, ctx: Case(
        ["check", str(ctx["adapter"]), "-b", str(ctx["baseline"]), "--junit", "/proc/x/j.xml", "-q"],
        "/proc"),
    "junit_is_a_folder": lambda tmp, ctx: Case(
        ["check", str(ctx["adapter"]), "-b", str(ctx["baseline"]), "--junit", str(tmp)], str(tmp)),
    "junit_reports_not_left_behind": junit_case,
    "snapshot_out_is_a_folder": lambda tmp, ctx: Case(
        ["snapshot", str(ctx["adapter"]), "--out", str(tmp)], str(tmp)),
    "baseline_deep": check_case("baseline", '{"a":' * DEEP),
    "baseline_1e999": check_case("baseline", '{"format": "deltaspec-baseline", "version": 1, "k": 1e999}'),
    "baseline_k_huge_int": check_case("baseline", '{"format": "deltaspec-baseline", "version": 1, "k": '
                                      + "9" * 400 + "}"),
    "baseline_nan": check_case("baseline", '{"format": "deltaspec-baseline", "version": NaN}'),
    "baseline_top_level_list": check_case("baseline", "[]"),
    "baseline_invalid_utf8": check_case("baseline", b'{"format": "\xc3\x28"}'),
    "baseline_empty": check_case("baseline", ""),
    "baseline_modules_list": check_case("baseline", json.dumps(
        {"format": "deltaspec-baseline", "version": 1, "modules": []})),
    "baseline_dev_zero": given_file("baseline", "/dev/zero"),
    "baseline_is_a_folder": given_file("baseline", "/tmp"),
    "baseline_missing": given_file("baseline", "/nonexistent/baseline.json"),
    "rules_toml_deep_arrays": check_case("rules", "a = " + "[" * DEEP, ".toml"),
    "rules_toml_deep_inline_tables": check_case("rules", "a = " + "{b = " * 5000, ".toml"),
    "rules_toml_deep_dotted_key": check_case("rules", "a." * 5000 + "b = 1", ".toml"),
    "rules_toml_inf": check_case("rules", "[defaults]\nfro_norm = inf\n", ".toml"),
    "rules_toml_huge_int": check_case("rules", "fail_on_new = " + "9" * 25 + "\n", ".toml"),
    "rules_toml_1e999": check_case("rules", "x = 1e999\n", ".toml"),
    "rules_toml_invalid_utf8": check_case("rules", b"x = '\xff'\n", ".toml"),
    "rules_json_deep": check_case("rules", "[" * DEEP, ".json"),
    "rules_json_list": check_case("rules", "[]", ".json"),
    "rules_ignore_catastrophic_backref": check_case("rules", 'ignore = ["((a)+\\\\2)+$"]\n', ".toml"),
    "rules_ignore_invalid": check_case("rules", 'ignore = ["("]\n', ".toml"),
    "rules_dev_zero": given_file("rules", "/dev/zero"),
    "spectrum_complex": spectrum_case(lambda: torch.randn(4, 3, dtype=torch.complex64), "complex64"),
    "spectrum_3d": spectrum_case(lambda: torch.randn(2, 3, 4), "2-D"),
    "spectrum_nan": spectrum_case(lambda: torch.tensor([[1.0, float("nan")]]), "NaN"),
}


def _fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "fifo")
    return str(tmp / "fifo")


def _config_folder(tmp: Path, ctx) -> Case:
    d = _copy(ctx, tmp)
    (d / CFG).unlink()
    (d / CFG).mkdir()
    return analyze_case(d, CFG)


def _ml_text(tmp: Path, text: str) -> Case:
    d = tmp / "ml"
    F.multilora_folder(d, {"m.q": (6, 5)})
    (d / "multilora_config.json").write_text(text)
    return analyze_case(d, "multilora_config.json")


def run_cli(argv: list[str]):
    return CliRunner().invoke(main, argv, env={"GITHUB_ACTIONS": "false"})


def assert_one_line_error(res, needle: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and res.stderr.endswith("\n"), res.stderr
    assert lines[0].startswith("deltaspec: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in res.output and not isinstance(res.exception, Exception) or \
        isinstance(res.exception, SystemExit), res.exception


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_is_one_line_exit_2(tmp_path, ctx, monkeypatch, case):
    c = HOSTILE[case](tmp_path, ctx)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    start = time.monotonic()
    if c.argv:
        with monkeypatch.context() as mp:
            if c.setup is not None:
                c.setup(mp)
            res = run_cli(c.argv)
        assert_one_line_error(res, c.needle)
        assert res.stdout == ""
    if c.api is not None:
        with pytest.raises(DeltaspecError) as info:
            c.api()
        assert "\n" not in str(info.value) and str(info.value)
    assert time.monotonic() - start < TIME_BOUND
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file, no folder
    assert list(out.iterdir()) == []
    for p in c.gone:
        assert not p.exists(), p
    assert Path("/dev/full").is_char_device()  # never replaced by a regular file


# ---- valid layouts --------------------------------------------------------------------------

def _hub_cache(src: Path, root: Path) -> Path:
    """``src`` laid out as a Hugging Face hub cache: snapshots/<rev>/name → ../../blobs/<sha>."""
    snap = root / "models--org--m" / "snapshots" / "0123abcd"
    blobs = root / "models--org--m" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        (blobs / f"{i:040x}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"{i:040x}")
    return snap


def _sharded_copy(ctx, tmp: Path) -> Path:
    d, weight_map = _sharded(tmp, ctx)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


def _to_dtype(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        t = load_file(str(f))
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}, str(f))
    return dst


def _values(df) -> np.ndarray:
    return df.sort_values("module")[["fro_norm", "spectral_norm", "effective_rank"]].to_numpy()


def test_hub_cache_symlinks_read_like_plain_folders(tmp_path, ctx):
    plain = deltaspec.analyze(ctx["full"], base=ctx["base"], intruders=False)
    unsharded = _hub_cache(ctx["full"], tmp_path / "c1")
    sharded = _hub_cache(_sharded_copy(ctx, tmp_path), tmp_path / "c2")
    base = _hub_cache(ctx["base"], tmp_path / "c3")
    for ft in (unsharded, sharded):
        df = deltaspec.analyze(ft, base=base, intruders=False)
        np.testing.assert_allclose(_values(df), _values(plain), rtol=1e-9)
    adapter = _hub_cache(ctx["adapter"], tmp_path / "c4")
    np.testing.assert_allclose(_values(deltaspec.analyze(adapter)),
                               _values(deltaspec.analyze(ctx["adapter"])), rtol=1e-9)
    res = run_cli(["analyze", str(sharded), "--base", str(base), "-q"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_checkpoints_are_read_as_float32(tmp_path, ctx, dtype):
    dt = getattr(torch, dtype)
    ft, base = _to_dtype(ctx["full"], tmp_path / "ft", dt), _to_dtype(ctx["base"], tmp_path / "b", dt)
    d = deltaspec.load(ft, base=base)
    name = "model.layers.0.self_attn.q_proj"
    want = (load_file(str(ft / "model.safetensors"))[name + ".weight"].double()
            - load_file(str(base / "model.safetensors"))[name + ".weight"].double())
    np.testing.assert_allclose(d[name].dense(torch.float64).numpy(), want.numpy(), atol=0)
    adapter = _to_dtype(ctx["adapter"], tmp_path / "a", dt)
    assert run_cli(["analyze", str(adapter), "-q"]).exit_code == 0


def test_valid_oddities_read(tmp_path, ctx):
    d = _copy(ctx, tmp_path, "bom")
    (d / CFG).write_bytes(b"\xef\xbb\xbf" + (d / CFG).read_bytes())  # a BOM, as Windows editors write
    assert len(deltaspec.analyze(d)) == 14
    out = tmp_path / ("o" * 245 + ".json")  # a legal 250-character name: its temporary one fits too
    res = run_cli(["analyze", str(ctx["adapter"]), "--format", "json", "--output", str(out), "-q"])
    assert res.exit_code == 0 and len(json.loads(out.read_text())) == 14, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bom", out.name]
    res = run_cli(["analyze", str(ctx["adapter"]), "--output", "/dev/null", "-q"])  # written in place
    assert res.exit_code == 0 and Path("/dev/null").is_char_device(), res.output
    odd = _copy(ctx, tmp_path, "odd")
    save_file(load_file(str(odd / WEIGHTS)) | {"x\ny\x1b": torch.ones(2)}, str(odd / WEIGHTS))
    res = run_cli(["analyze", str(odd)])
    notes = res.stderr.splitlines()  # each note is one line, the odd name escaped in it
    assert res.exit_code == 0 and all(n.startswith("note: ") for n in notes), res.stderr
    assert any("x\\ny\\x1b" in n for n in notes), res.stderr
    shutil.rmtree(odd)
    res = run_cli(["check", str(ctx["adapter"]), "-b", str(ctx["baseline"]), "--junit",
                   str(tmp_path / "reports" / "ci" / "x.xml"), "-q"])
    assert res.exit_code == 0 and (tmp_path / "reports" / "ci" / "x.xml").is_file(), res.output


def test_catastrophic_pattern_keys_keep_peft_results_quickly(tmp_path, ctx, llama):
    """Keys that make ``re`` backtrack for minutes give PEFT's match result at once: the oracle is
    PEFT's merge of the same adapter saved with plain keys that match the same modules."""
    model, _ = llama
    folder, pm = F.lora_adapter(model, tmp_path / "pat", r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"],
                                alpha_pattern={"q_proj": 16, "v_proj": 12})
    cfg = json.loads((folder / CFG).read_text())
    cfg["alpha_pattern"] = {r"(a|aa)+$": 2, r"(\w+\.?)+q_proj": 16, ".*.*.*.*.*v_proj": 12}
    (folder / CFG).write_text(json.dumps(cfg))
    start = time.monotonic()
    deltas = deltaspec.load(folder)
    got = {n: d.dense(torch.float64) for n, d in deltas.items()}
    assert time.monotonic() - start < 5
    want = F.expected_deltas(model, pm)
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n].numpy(), want[n].numpy(), rtol=1e-5, atol=1e-7)


def test_integer_buffers_of_a_full_checkpoint_are_skipped(tmp_path, ctx):
    ft = shutil.copytree(ctx["full"], tmp_path / "ft")
    t = load_file(str(ft / "model.safetensors"))
    save_file(t | {"model.position_ids": torch.arange(8)[None]}, str(ft / "model.safetensors"))
    d = deltaspec.load(ft, base=ctx["base"])
    assert ("model.position_ids", "integer or bool tensor (a buffer or quantised data), not a weight") \
        in d.skipped


def test_tiny_float64_matrix_keeps_its_spectrum():
    """Entries near 1e-200 square to 0 in a Gram: the engine scales first (σ exact to 1e-12)."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 25, generator=g, dtype=torch.float64)
    want = np.linalg.svd(m.numpy(), compute_uv=False)
    for scale in (1e-200, 1e-300, 1e-160):
        got = deltaspec.spectrum(m * scale).values.numpy() / scale
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_float8_tensor_spectrum():
    m = torch.randn(6, 4).to(torch.float8_e4m3fn)
    want = np.linalg.svd(m.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(deltaspec.spectrum(m).values.numpy(), want, rtol=1e-12)
