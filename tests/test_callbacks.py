"""The live monitor: fail_on stops a genuine Trainer run, analysis errors never crash training,
full models against their starting weights, nothing imported at ``import deltaspec``."""

from __future__ import annotations

import subprocess
import sys
import warnings
from types import SimpleNamespace

import factories as F
import pytest
import torch

import deltaspec
from deltaspec.callbacks import SpectralCallback
from deltaspec.errors import ConfigError, DeltaspecWarning, UsageError


def _state(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, log_history=[])


def test_import_pulls_in_no_framework():
    code = ("import sys, deltaspec, deltaspec.callbacks; "
            "print(any(m in sys.modules for m in ('transformers', 'lightning', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fail_on_stops_training(tmp_path):
    cb = SpectralCallback(every=4, fail_on={"top1_share": "<= 0.05"})
    with pytest.warns(DeltaspecWarning, match="stopping training at step 4"):
        trainer = F.trainer_lora_run(tmp_path, steps=12, save_steps=50, callbacks=[cb])
    assert trainer.state.global_step == 4
    assert cb.stop_reason is not None and "top1_share" in cb.stop_reason
    assert "> 0.05 (fail_on)" in cb.stop_reason and "\n" not in cb.stop_reason


def test_analysis_error_warns_once_and_disables(llama_lora):
    from transformers import TrainerControl

    _, pm = llama_lora
    cb = SpectralCallback(every=1)
    model = __import__("copy").deepcopy(pm)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    control = TrainerControl()
    with pytest.warns(DeltaspecWarning, match="monitor turned off at step 1.*NaN"):
        cb.on_step_end(None, _state(1), control, model=model)
    assert not cb.monitor.enabled and not control.should_training_stop
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_step_end(None, _state(2), control, model=model)  # off: no second warning


def test_full_model_against_its_starting_weights():
    """A plain nn.Module: the weights when training begins are the base."""
    from transformers import TrainerControl

    model = F.tiny_llama(seed=3)
    cb = SpectralCallback(every=2, k=2, include=r"layers\.0\.self_attn\.[qk]_proj")
    cb.on_train_begin(None, _state(0), TrainerControl(), model=model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                m, n = p.shape
                p.add_(0.01 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g))
    state = _state(2)
    cb.on_step_end(None, state, TrainerControl(), model=model)
    (logged,) = state.log_history
    ref = deltaspec.analyze(model, base=F.tiny_llama(seed=3), include=r"layers\.0\.self_attn\.[qk]_proj")
    assert len(ref) == 2
    for _, row in ref.iterrows():
        key = f"deltaspec/{row['kind']}/effective_rank"
        assert logged[key] == pytest.approx(row["effective_rank"], abs=1e-6)
        assert logged[key] == pytest.approx(3.0, abs=0.5)  # a rank-3 update


def test_bad_arguments():
    with pytest.raises(UsageError, match="every"):
        SpectralCallback(every=0)
    with pytest.raises(UsageError, match="metrics: unknown cosine"):
        SpectralCallback(metrics=["cosine"])
    with pytest.raises(ConfigError, match="unknown metric"):
        SpectralCallback(fail_on={"entropyy": ">= 1"})
    with pytest.raises(ConfigError, match="cannot read bound"):
        SpectralCallback(fail_on={"top1_share": "at most 0.5"})


def _fresh_lightning_module(monkeypatch, pytorch):
    """deltaspec.callbacks.lightning imported against ``pytorch`` as ``lightning.pytorch``
    (None: Lightning not installed)."""
    import importlib

    monkeypatch.setitem(sys.modules, "lightning", SimpleNamespace(pytorch=pytorch))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", pytorch)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.delitem(sys.modules, "deltaspec.callbacks.lightning", raising=False)
    return importlib.import_module("deltaspec.callbacks.lightning")


def test_lightning_twin_logs_and_stops(monkeypatch, llama_lora):
    """The Lightning callback's own logic against a stand-in ``lightning.pytorch.Callback`` (Lightning
    is an optional extra, not installed here)."""
    _, pm = llama_lora
    mod = _fresh_lightning_module(monkeypatch, SimpleNamespace(Callback=object))
    logged = []
    trainer = SimpleNamespace(global_step=0, should_stop=False, logger=SimpleNamespace(
        log_metrics=lambda m, step: logged.append((step, m))))
    cb = mod.SpectralLightningCallback(every=3, fail_on={"top1_share": "<= 0.01"})
    cb.on_train_start(trainer, pm)
    for step in (1, 2, 3, 3):  # gradient accumulation: step 3 seen twice, logged once
        trainer.global_step = step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeltaspecWarning)
            cb.on_train_batch_end(trainer, pm, None, None, 0)
    assert [s for s, _ in logged] == [3] and trainer.should_stop
    ref = deltaspec.analyze(pm)
    q = ref[ref["kind"] == "q_proj"]["normalized_entropy"].mean()
    assert logged[0][1]["deltaspec/q_proj/normalized_entropy"] == pytest.approx(q, abs=1e-6)


def test_lightning_missing_is_one_line(monkeypatch):
    mod = _fresh_lightning_module(monkeypatch, None)  # importing never fails (doctests, docs)
    with pytest.raises(UsageError, match="pip install lightning"):
        mod.SpectralLightningCallback()
