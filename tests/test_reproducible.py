"""Reproducibility of the training reference and the demo, early stopping, LoRA-style init."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from deltaspec.reference import (
    AdapterConfig,
    DataConfig,
    ModelConfig,
    MultiLoRALinear,
    TrainConfig,
    build_mixture,
    finetune,
    pretrain,
)

TINY = ModelConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
DATA = DataConfig(n_pretrain_lines=200, n_train_per_task=40, n_heldout_per_task=4,
                  n_validation_per_task=4)
STEPS = TrainConfig(steps=4, batch_size=4, warmup_steps=1, seq_len=32)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out |= {f"{f.name}:{k}": fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    return out


def _numbers(m: dict) -> dict:
    """The metrics without what is allowed to differ between runs (times, rates, paths, RSS)."""
    drop = re.compile(r"time|_s$|per_s|rss|path")
    return {k: _numbers(v) if isinstance(v, dict) else v for k, v in m.items() if not drop.search(k)}


def test_same_seed_and_threads_give_bit_identical_checkpoints(tmp_path: Path) -> None:
    runs = []
    for i in range(2):
        base = pretrain(tmp_path / f"base{i}", TINY, STEPS, DATA, threads=1)
        ft = finetune("multilora", tmp_path / f"base{i}", tmp_path / f"ml{i}",
                      AdapterConfig(n=2, r=2), replace(STEPS, seed=3), threads=1)
        runs.append((base, ft))
    for name in ("base", "ml"):
        a, b = _tensors(tmp_path / f"{name}0"), _tensors(tmp_path / f"{name}1")
        assert a and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _numbers(runs[0][1]) == _numbers(runs[1][1])
    other = finetune("multilora", tmp_path / "base0", tmp_path / "ml-seed4",
                     AdapterConfig(n=2, r=2), replace(STEPS, seed=4), threads=1)
    assert other["loss"]["curve"] != runs[0][1]["loss"]["curve"]  # the seed does matter
    assert not torch.are_deterministic_algorithms_enabled()  # restored on exit


def test_early_stopping_stops_by_patience_and_keeps_the_best(tmp_path: Path) -> None:
    pretrain(tmp_path / "base", TINY, STEPS, DATA, threads=1)
    cfg = TrainConfig(steps=200, batch_size=4, warmup_steps=1, lr=0.5, eval_every=2, patience=2,
                      min_delta=10.0)  # nothing improves by 10 nats: stops after 3 evaluations
    m = finetune("lora", tmp_path / "base", tmp_path / "lora", AdapterConfig(n=1, r=2), cfg,
                 threads=1)
    es = m["early_stopping"]
    assert m["steps_run"] == 6 == es["steps_run"] and es["best_step"] == 2
    assert [s for s, _ in es["heldout_loss_curve"]] == [2, 4, 6]
    assert es["best_heldout_loss"] == es["heldout_loss_curve"][0][1]


def test_plateau_lowers_the_learning_rate_before_stopping(tmp_path: Path) -> None:
    """With lr_drops=1 the first plateau lowers the rate and training goes on; the second stops."""
    pretrain(tmp_path / "base", TINY, STEPS, DATA, threads=1)
    cfg = TrainConfig(steps=200, batch_size=4, warmup_steps=1, lr=0.5, eval_every=2, patience=2,
                      min_delta=10.0, lr_drops=1, lr_drop_factor=0.1)
    m = finetune("lora", tmp_path / "base", tmp_path / "lora", AdapterConfig(n=1, r=2), cfg,
                 threads=1)
    es = m["early_stopping"]
    assert es["lr_drops_at"] == [6] and m["steps_run"] == 10 and es["best_step"] == 2


def test_validation_split_is_disjoint_from_heldout_and_leaves_other_splits_alone() -> None:
    mix = build_mixture(DATA)
    assert mix.validation and "capital" not in mix.validation
    for task, exs in mix.validation.items():
        assert len(exs) == DATA.n_validation_per_task
        assert not {e.prompt for e in exs} & {e.prompt for e in mix.heldout[task]}
        assert not {e.prompt for e in exs} & {e.prompt for e in mix.train[task]}
    fewer = build_mixture(DataConfig(**{**DATA.to_dict(), "n_validation_per_task": 1,
                                        "word_len": (3, 5)}))
    assert fewer.train == mix.train and fewer.heldout == mix.heldout


def test_multilora_lora_init_is_zero_b_unit_scalings() -> None:
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(12, 10), n=3, r=2, init="lora")
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.all(layer.lora_scaling == 1)
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
    assert torch.equal(layer.delta_weight(), torch.zeros(10, 12))
    paper = MultiLoRALinear(nn.Linear(12, 10), n=3, r=2)
    assert torch.count_nonzero(paper.lora_B) == paper.lora_B.numel()
    assert torch.count_nonzero(paper.lora_scaling) == 0
    with pytest.raises(ValueError, match="init"):
        MultiLoRALinear(nn.Linear(12, 10), n=3, r=2, init="pissa")
