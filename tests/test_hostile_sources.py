"""Hostile and new-user edges of where checkpoints come from: Hub revisions and cache containment,
bases named by configs, mistyped paths, index shards and live tensors (issue 23)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import factories as F
import hubcache as H
import pytest
import torch

import deltaspec
from deltaspec.errors import CheckpointError, DeltaspecError, DeltaspecWarning, UsageError
from deltaspec.loaders.sources import discovery, hub

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, llama):
    """A Hub cache with org/base and org/lora (the adapter naming org/base), and the plain folders."""
    model, base = llama
    root = tmp_path_factory.mktemp("hostile_hub")
    adapter, _ = F.lora_adapter(model, root / "lora", r=2, lora_alpha=4, target_modules=TARGETS)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "org/base"}))
    hub_root = root / "cache"
    H.add_repo(hub_root, "org/base", base)
    H.add_repo(hub_root, "org/lora", adapter)
    return {"root": root, "cache": hub_root, "lora": adapter, "base": base}


@pytest.fixture
def offline(cache, monkeypatch):
    H.offline_env(monkeypatch, cache["cache"])
    return cache


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("rev", ["../../x", "..", "/etc", "a/../../b", "a//b", ".hidden", "x.lock",
                                 "a\\b", "@{-1}", "x" * 300])
def test_hostile_revisions_are_refused_before_any_path(offline, rev, monkeypatch):
    touched = []
    monkeypatch.setattr(hub, "cached_folder", lambda *a, **k: touched.append(a) or None)
    with pytest.raises(DeltaspecError) as exc:
        deltaspec.load("org/lora", revision=rev)
    assert "revision" in _one_line(exc) and not touched
    if "/" not in rev and "\\" not in rev and "@" not in rev:
        with pytest.raises(DeltaspecError, match="not a branch, tag or commit name"):
            deltaspec.load(f"org/lora@{rev}")
    assert not hub.valid_revision(rev)


def test_valid_revisions_still_resolve(offline):
    assert all(hub.valid_revision(r) for r in ("main", "v1.0", "refs-pr-1", "release/2024-01", "a" * 40))
    assert len(deltaspec.load("org/lora@main", discover_base=False)) > 0


def test_a_base_named_with_a_hostile_revision_is_a_note(offline, tmp_path):
    adapter = shutil.copytree(offline["lora"], tmp_path / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path":
                                                                   "org/base@../../../etc"}))
    with pytest.warns(DeltaspecWarning, match="not used"):
        deltaspec.load(adapter)


def test_a_snapshot_file_resolving_outside_the_cache_is_refused(offline, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps({"peft_type": "LORA"}))
    snap = next((offline["cache"] / "models--org--lora" / "snapshots").iterdir())
    link = snap / "adapter_config.json"
    saved = os.readlink(link)
    link.unlink()
    link.symlink_to(outside)
    try:
        with pytest.raises(CheckpointError) as exc:
            deltaspec.load("org/lora")
        assert "resolves outside the Hub cache" in _one_line(exc)
    finally:
        link.unlink()
        link.symlink_to(saved)


@pytest.mark.parametrize("named", [".", "../..", "/", "~", "/dev/zero", "/proc/self", "x" * 5000,
                                   "bad\x00name", "~nosuchuser/x"])
def test_a_base_named_by_config_that_is_no_model_folder_is_a_note(cache, tmp_path, named):
    adapter = shutil.copytree(cache["lora"], tmp_path / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": named}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        deltas = deltaspec.load(adapter)
    assert len(deltas) == 4 and all(d.base is None for d in deltas.values())
    assert any("analysing without a base" in str(w.message) for w in seen)


def test_discovery_never_downloads(cache, tmp_path, monkeypatch):
    """Online, with the named base not cached: a note saying how to fetch it, no download."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(hub, "_download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.warns(DeltaspecWarning, match=r"discovery does not download: pass --base org/base"):
        deltas = deltaspec.load(cache["lora"])
    assert all(d.base is None for d in deltas.values())


def test_a_mistyped_local_path_is_no_such_file(cache, tmp_path, monkeypatch):
    (tmp_path / "demo-report").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "hub_folder", lambda *a, **k: pytest.fail("asked the Hub"))
    with pytest.raises(CheckpointError) as exc:
        deltaspec.load("demo-report/lora")
    text = _one_line(exc)
    assert "no such file or directory" in text and "hf download" not in text


def test_an_index_shard_linking_out_of_the_folder_is_refused(llama, tmp_path):
    model, _ = llama
    base = F.save_model(model, tmp_path / "base", max_shard_size="20KB")
    shard = sorted(base.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError) as exc:
        deltaspec.load(F.full_finetune(model, tmp_path / "ft"), base=base)
    assert "resolves outside" in _one_line(exc) and shard.name in str(exc.value)


@pytest.mark.parametrize("make", [lambda: torch.empty(4, 4, device="meta"),
                                  lambda: torch.eye(4).to_sparse()])
def test_live_state_dicts_on_meta_or_sparse_are_one_line(make):
    bad, good = {"layer.weight": make()}, {"layer.weight": torch.eye(4)}
    for ft, base in ((bad, good), (good, bad)):
        with pytest.raises(UsageError) as exc:
            deltaspec.load(ft, base=base)
        assert "'layer.weight'" in _one_line(exc)


def test_discovery_uses_only_model_folders(tmp_path):
    assert not discovery.holds_model_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert discovery.holds_model_weights(tmp_path)
    assert not discovery.holds_model_weights(tmp_path / "model.safetensors")
