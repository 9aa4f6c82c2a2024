"""Bad input, through the CLI (exit 2, one line, no traceback, no output file) and the API."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import factories as F
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import deltaspec
from deltaspec import errors as E
from deltaspec.cli import main


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncated(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = copy_adapter(ctx["adapter"], tmp / "a")
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return [str(d)], "adapter_model.safetensors"


def _garbage(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = copy_adapter(ctx["adapter"], tmp / "a")
    (d / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    return [str(d)], "adapter_model.safetensors"


def _garbage_bin(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = tmp / "ft"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + os.urandom(2000))
    return [str(d), "--base", str(ctx["base"])], "pytorch_model.bin"


def _no_config(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = copy_adapter(ctx["adapter"], tmp / "a")
    (d / "adapter_config.json").unlink()
    return [str(d)], "adapter_config.json"


def _no_weights(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = copy_adapter(ctx["adapter"], tmp / "a")
    (d / "adapter_model.safetensors").unlink()
    return [str(d)], "adapter_model.safetensors"


def _bad_json(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = copy_adapter(ctx["adapter"], tmp / "a")
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    return [str(d)], "adapter_config.json"


def _peft_type(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = copy_adapter(ctx["adapter"], tmp / "a")
    cfg = json.loads((d / "adapter_config.json").read_text()) | {"peft_type": "HRA"}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return [str(d)], "adapter_config.json"


def _other_base(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=False))
    base = F.save_model(other, tmp / "other")
    return [str(ctx["adapter"]), "--base", str(base)], "model.layers.0.mlp.down_proj.weight"


def _full_other_base(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    args, _ = _other_base(tmp, ctx)
    return [str(ctx["full"]), *args[1:]], "lm_head.weight"


def _no_base(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    return [str(ctx["full"])], "--base"


def _nan(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = copy_adapter(ctx["adapter"], tmp / "a")
    w = d / "adapter_model.safetensors"
    tensors = load_file(str(w))
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][3, 1] = float("nan")
    save_file(tensors, str(w))
    return [str(d)], "model.layers.1.mlp.up_proj.lora_B.weight"


def _inf_full(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = shutil.copytree(ctx["full"], tmp / "ft")
    w = d / "model.safetensors"
    tensors = load_file(str(w))
    tensors["model.layers.0.self_attn.v_proj.weight"][0, 0] = float("inf")
    save_file(tensors, str(w))
    return [str(d), "--base", str(ctx["base"])], "model.layers.0.self_attn.v_proj.weight"


def _empty(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = copy_adapter(ctx["adapter"], tmp / "a")
    save_file({}, str(d / "adapter_model.safetensors"))
    return [str(d)], "adapter_model.safetensors"


def _sharded(tmp: Path, ctx: dict, shard: str) -> Path:
    d = shutil.copytree(ctx["full"], tmp / "ft")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    keys = load_file(str(d / "model-00001-of-00001.safetensors")).keys()
    weight_map = {k: "model-00001-of-00001.safetensors" for k in keys}
    weight_map["model.layers.0.mlp.up_proj.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


def _outside(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    (tmp / "x.safetensors").write_bytes((ctx["full"] / "model.safetensors").read_bytes())
    d = _sharded(tmp, ctx, "../x.safetensors")
    return [str(d), "--base", str(ctx["base"])], "model.safetensors.index.json"


def _missing_shard(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = _sharded(tmp, ctx, "model-00002-of-00002.safetensors")
    return [str(d), "--base", str(ctx["base"])], "model-00002-of-00002.safetensors"


def _missing(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    return [str(tmp / "nowhere")], "nowhere"


def _not_checkpoint(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    d = tmp / "notes"
    d.mkdir()
    (d / "README.md").write_text("hello")
    return [str(d)], "notes"


def _missing_base(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    return [str(ctx["full"]), "--base", str(tmp / "gone")], "gone"


def _unrelated_base(tmp: Path, ctx: dict) -> tuple[list[str], str]:
    base = F.save_state_dict(F.tiny_conv(), tmp / "conv")
    return [str(ctx["full"]), "--base", str(base)], "counterpart in this base"


# case → (builder, the DeltaspecError subclass the API raises)
CASES = {
    "missing_path": (_missing, E.CheckpointError),
    "not_a_checkpoint": (_not_checkpoint, E.CheckpointError),
    "missing_base": (_missing_base, E.CheckpointError),
    "truncated_safetensors": (_truncated, E.CheckpointError),
    "garbage_safetensors": (_garbage, E.CheckpointError),
    "garbage_bin": (_garbage_bin, E.CheckpointError),
    "no_adapter_config": (_no_config, E.ConfigError),
    "unparsable_adapter_config": (_bad_json, E.ConfigError),
    "no_adapter_weights": (_no_weights, E.CheckpointError),
    "unknown_peft_type": (_peft_type, E.UnsupportedError),
    "lora_base_shapes_differ": (_other_base, E.ShapeError),
    "full_base_shapes_differ": (_full_other_base, E.ShapeError),
    "full_without_base": (_no_base, E.CheckpointError),
    "full_unrelated_base": (_unrelated_base, E.CheckpointError),
    "nan_in_adapter": (_nan, E.NumericalError),
    "inf_in_full": (_inf_full, E.NumericalError),
    "empty_adapter": (_empty, E.CheckpointError),
    "weight_map_outside": (_outside, E.CheckpointError),
    "weight_map_missing_shard": (_missing_shard, E.CheckpointError),
}


@pytest.fixture(scope="module")
def ctx(llama, llama_lora, llama_full):
    return {"adapter": llama_lora[0], "base": llama[1], "full": llama_full}


def _api(args: list[str]) -> None:
    base = args[args.index("--base") + 1] if "--base" in args else None
    deltaspec.analyze(args[0], base=base, intruders=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_one_line_exit_2_no_output_file(tmp_path, ctx, case):
    builder, _ = CASES[case]
    args, needle = builder(tmp_path, ctx)
    out = tmp_path / "out" / "result.json"
    out.parent.mkdir()
    res = CliRunner().invoke(main, ["analyze", *args, "--format", "json", "--output", str(out), "-q"])
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltaspec: error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.output and res.stdout == ""
    assert list(out.parent.iterdir()) == []  # no result, no temporary file


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_raises_deltaspec_error(tmp_path, ctx, case):
    builder, kind = CASES[case]
    args, needle = builder(tmp_path, ctx)
    with pytest.raises(kind) as info:
        _api(args)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_subprocess_prints_no_traceback(tmp_path, ctx):
    args, needle = _truncated(tmp_path, ctx)
    proc = subprocess.run([sys.executable, "-m", "deltaspec.cli", "analyze", *args],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltaspec: error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_nan_is_named_at_load_time_of_the_tensor(tmp_path, ctx):
    args, _ = _nan(tmp_path, ctx)
    deltas = deltaspec.load(args[0])  # lazy: loading reads no tensor
    with pytest.raises(E.NumericalError, match=r"up_proj\.lora_B\.weight.*1 NaN/Inf"):
        deltas["model.layers.1.mlp.up_proj"].factors()


def test_several_adapters_need_a_choice(tmp_path, ctx):
    for name in ("one", "two"):
        copy_adapter(ctx["adapter"], tmp_path / "runs" / name)
    with pytest.raises(E.UsageError, match="one, two"):
        deltaspec.load(tmp_path / "runs")
    assert len(deltaspec.load(tmp_path / "runs" / "two")) == 14


def test_zero_update_is_a_row_of_zeros(tmp_path, llama):
    """PEFT's default init (B = 0): ΔW = 0 exactly — zeros and NaN similarity, never a crash."""
    model, base = llama
    folder, _ = F.lora_adapter(model, tmp_path / "zero", r=4, target_modules=["q_proj", "v_proj"],
                               init_lora_weights=True)
    deltas = deltaspec.load(folder)
    assert all(not d.dense().any() for d in deltas.values())
    df = deltaspec.analyze(folder)
    assert len(df) == 4
    for col in ("fro_norm", "spectral_norm", "nuclear_norm", "entropy", "normalized_entropy",
                "rank", "energy_rank_90", "stable_rank"):
        assert (df[col] == 0).all(), col
    cmp = deltaspec.compare(folder, folder)
    assert len(cmp) == 4
    assert all(math.isnan(v) for v in cmp["subspace_sim_left"]) and all(math.isnan(v) for v in cmp["cosine"])
    res = CliRunner().invoke(main, ["analyze", str(folder), "--base", str(base), "-q"])
    assert res.exit_code == 0, res.output


def test_unreadable_base_for_dora_is_one_line(tmp_path, llama):
    model, _ = llama
    folder, _ = F.lora_adapter(model, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    res = CliRunner().invoke(main, ["analyze", str(folder)])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "--base" in res.stderr
