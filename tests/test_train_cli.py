"""Tests of ``deltaspec train`` (the CLI of the training reference) and its --hf-model option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from deltaspec.cli import main


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_train_multilora_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTASPEC_CACHE", str(tmp_path / "cache"))  # the cache demo uses too
    out = tmp_path / "ml"
    result = CliRunner().invoke(main, ["train", "--method", "multilora", "--quick", "--steps", "3",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out exact-match accuracy" in result.output
    assert "tokens/s" in result.output and "peak mem" in result.output
    cfg = json.loads((out / "multilora_config.json").read_text())
    assert (cfg["n"], cfg["r"], cfg["scaling_shape"]) == (4, 4, "n")
    assert Path(cfg["base_model_name_or_path"]).parent == tmp_path / "cache"
    assert (out / "multilora_model.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["method"] == "multilora"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deltaspec.reference import DataConfig, ModelConfig, TrainConfig, pretrain

    base = tmp_path_factory.mktemp("cache") / "base"
    pretrain(base, ModelConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32),
             TrainConfig(steps=2, batch_size=4, warmup_steps=1, seq_len=32),
             DataConfig(n_pretrain_lines=100, n_train_per_task=20, n_heldout_per_task=4))
    return base


def test_train_reuses_base_dir_and_prints_json(tmp_path: Path, tiny_base: Path) -> None:
    args = ["train", "--method", "lora", "--steps", "2", "--n", "2",
            "--r", "2", "--out", str(tmp_path / "lora"), "--base-dir", str(tiny_base),
            "-q", "--format", "json", "--threads", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["config"]["adapter"]["lora_rank"] == 4
    assert metrics["config"]["data"]["n_heldout_per_task"] == 4  # the base's own data config
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 4
    assert metrics["environment"]["threads"] == 3  # any thread count
    args = ["train", "--method", "lora", "--steps", "2", "--rank", "3", "--out",
            str(tmp_path / "lora3"), "--base-dir", str(tiny_base), "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "lora (rank 3 (--rank))" in result.output
    result = CliRunner().invoke(main, ["train", "--method", "lora", "--steps", "2", "--out",
                                       str(tmp_path / "lora16"), "--base-dir", str(tiny_base)])
    assert "rank 16 (n·r = 4·4, the trainable parameters of MultiLoRA 4 x 4)" in result.output
    args = ["train", "--method", "full", "--steps", "2", "--out", str(tmp_path / "full"),
            "--base-dir", str(tiny_base), "-q", "--format", "csv"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "method,task,heldout_accuracy,train_accuracy"
    assert len(result.output.splitlines()) == 1 + 7


def test_train_logs_its_trajectory(tmp_path: Path, tiny_base: Path) -> None:
    """--log-points: the update saved at evenly spaced steps and their trajectory logged, its
    numbers those of deltaspec.analyze over the top n·r values."""
    import pandas as pd

    import deltaspec

    for method in ("lora", "full"):
        out = tmp_path / method
        result = CliRunner().invoke(main, ["train", "--method", method, "--steps", "4", "--n",
                                           "2", "--r", "2", "--log-points", "2", "--out",
                                           str(out), "--base-dir", str(tiny_base)])
        assert result.exit_code == 0, result.output
        assert f"trajectory: {out / 'trajectory.csv'}" in result.output
        log = pd.read_csv(out / "trajectory.csv")
        assert sorted(set(log["step"])) == [2, 4] and log["top_k"].eq(4).all()
        ref = deltaspec.analyze(out / "trajectory" / "checkpoint-2", base=tiny_base, top_k=4)
        got = log[log["step"] == 2].set_index("module").loc[ref["module"]]
        for col in ("normalized_entropy", "effective_rank", "top1_share"):
            assert got[col].tolist() == pytest.approx(ref[col].tolist(), abs=1e-9), col
        assert all(c == pytest.approx(1.0) for c in log.loc[log["step"] == 4, "cosine_final"])


@pytest.mark.parametrize(
    "bad",
    [["--n", "0"], ["--r", "-1"], ["--steps", "0"], ["--alpha", "0"], ["--lr", "-1"]],
)
def test_train_bad_option_exits_2_with_one_line(tmp_path: Path, bad: list[str]) -> None:
    args = ["train", "--method", "multilora", "--quick", "--out", str(tmp_path / "x"), *bad]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltaspec: error:"), result.output
    assert not (tmp_path / "x").exists()


def test_train_refuses_foreign_base_dir(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "llama"}')
    (foreign / "model.safetensors").write_bytes(b"")
    args = ["train", "--method", "lora", "--quick", "--out", str(tmp_path / "x"),
            "--base-dir", str(foreign)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "not a deltaspec reference base" in result.output
    assert (foreign / "config.json").read_text() == '{"model_type": "llama"}'


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _hf_train(tmp_path: Path, llama: Path, method: str) -> Path:
    out = tmp_path / method
    args = ["train", "--method", method, "--quick", "--steps", "3", "--n", "2", "--r", "2",
            "--match-params", "--hf-model", str(llama), "--out", str(out), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


def test_hf_model_lora_matches_peft_merge(tmp_path: Path, tiny_llama: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = _hf_train(tmp_path, tiny_llama, "lora")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(tiny_llama.resolve())
    tensors = _read(out / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (16, 4)  # k_proj: 2 kv heads of width 8
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_llama)
    w0 = base.model.layers[0].self_attn.k_proj.weight.detach().clone()
    merged = peft.PeftModel.from_pretrained(base, out).merge_and_unload()
    dw = merged.model.layers[0].self_attn.k_proj.weight.detach() - w0
    torch.testing.assert_close(dw, b @ a * cfg["lora_alpha"] / cfg["r"], rtol=1e-4, atol=1e-6)
    assert b.abs().sum() > 0


def test_hf_model_multilora_and_full(tmp_path: Path, tiny_llama: Path) -> None:
    out = _hf_train(tmp_path, tiny_llama, "multilora")
    tensors = _read(out / "multilora_model.safetensors")
    assert tensors["model.layers.1.self_attn.v_proj.lora_B"].shape == (2, 16, 2)
    assert tensors["model.layers.1.mlp.down_proj.lora_A"].shape == (2, 2, 64)
    out = _hf_train(tmp_path, tiny_llama, "full")
    assert "model.layers.0.self_attn.q_proj.weight" in _read(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tokenizer"] == "reference-char"
