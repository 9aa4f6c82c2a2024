"""Hugging Face Hub ids: resolved from a genuine hub cache (symlinked blobs), offline.

The cache is laid out as huggingface_hub writes it (see ``hubcache.py``); every run has
HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at it, so nothing can be downloaded. Results from an
id must equal the results from the plain folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import factories as F
import hubcache as H
import pandas as pd
import pytest
from click.testing import CliRunner

import deltaspec
from deltaspec.cli import main
from deltaspec.errors import CheckpointError, DeltaspecWarning
from deltaspec.loaders.sources import hub as sources

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory, llama):
    """Plain folders and the same checkpoints as Hub repos of one cache (sharded base and fine-tune)."""
    model, _ = llama
    root = tmp_path_factory.mktemp("hub")
    plain = {
        "base": F.save_model(model, root / "base", max_shard_size="20KB"),
        "ft": F.full_finetune(model, root / "ft", max_shard_size="20KB"),
        "base1": F.save_model(model, root / "base1"),  # unsharded
    }
    adapter, _ = F.lora_adapter(model, root / "lora", r=4, lora_alpha=8, target_modules=TARGETS)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "org/base"}))
    plain["lora"] = adapter
    cache = root / "cache"
    for name, folder in plain.items():
        H.add_repo(cache, f"org/{name}", folder)
    H.add_repo(cache, "org/lora", adapter, revision="v1", commit="1" * 40)
    return plain, cache


@pytest.fixture
def offline(hub, monkeypatch):
    plain, cache = hub
    H.offline_env(monkeypatch, cache)
    return plain


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(pd.DataFrame(a), pd.DataFrame(b))


def test_the_cache_is_a_symlink_tree(hub):
    _, cache = hub
    shards = sorted((cache / "models--org--ft" / "snapshots").glob("*/model-*.safetensors"))
    assert len(shards) > 1 and all(p.is_symlink() for p in shards)
    assert all(os.readlink(p).startswith("../../blobs/") for p in shards)


def test_full_finetune_from_ids_equals_plain_folders(offline):
    by_id = deltaspec.analyze("org/ft", base="org/base", intruders=False)
    by_path = deltaspec.analyze(offline["ft"], base=offline["base"], intruders=False)
    assert len(by_id) == 16
    _same(by_id, by_path)
    _same(deltaspec.analyze("org/ft", base="org/base1", intruders=False), by_path)


def test_adapter_finds_its_base_from_its_config(offline):
    with pytest.warns(DeltaspecWarning, match="base: org/base"):
        found = deltaspec.analyze("org/lora", intruders=False)
    assert "relative_norm" in found.columns
    _same(found, deltaspec.analyze(offline["lora"], base=offline["base"], intruders=False))
    plain = deltaspec.analyze("org/lora", discover_base=False)
    assert "relative_norm" not in plain.columns


def test_a_base_other_than_the_named_one_warns(offline):
    with pytest.warns(DeltaspecWarning, match="not the model adapter_config.json names"):
        deltaspec.load("org/lora", base=offline["ft"])


def test_revision_and_compare_with_ids(offline):
    cmp_id = deltaspec.compare("org/lora@v1", "org/ft", base="org/base", intruders=False)
    cmp_path = deltaspec.compare(offline["lora"], offline["ft"], base=offline["base"], intruders=False)
    _same(cmp_id, cmp_path)
    assert len(deltaspec.load("org/lora", revision="v1")) == 6


def test_uncached_id_is_one_line_naming_it(offline):
    with pytest.raises(CheckpointError, match=r"org/missing: checkpoint is not cached .*HF_HUB_OFFLINE"):
        deltaspec.load("org/missing")
    with pytest.raises(CheckpointError, match=r"org/lora@v9: checkpoint is not cached"):
        deltaspec.load("org/lora@v9")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        deltaspec.load("not/an/id")  # three parts: a path, not an id


def test_cli_from_ids_in_a_subprocess(hub, tmp_path):
    """As a user runs it: env only (huggingface_hub reads it at import), exit 2 for an uncached id."""
    plain, cache = hub
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "deltaspec.cli", *map(str, args), "--format", "csv",
                               "--no-intruders"], capture_output=True, text=True, env=env, check=False)

    by_id, by_path = cli("analyze", "org/lora"), cli("analyze", plain["lora"], "--base", plain["base"])
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_path.stdout and "relative_norm" in by_id.stdout
    assert "note: base: org/base (from adapter_config.json" in by_id.stderr
    missing = cli("analyze", "org/missing")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "org/missing" in missing.stderr
    assert "hf download org/missing" in missing.stderr and "Traceback" not in missing.stderr


def test_report_collects_ids(offline):
    from deltaspec.report import collect

    by_id = collect({"lora": "org/lora", "full": "org/ft"}, base="org/base")
    by_path = collect({"lora": offline["lora"], "full": offline["ft"]}, base=offline["base"])
    pd.testing.assert_frame_equal(by_id.metrics, by_path.metrics)


def test_cli_base_discovery_can_be_turned_off(offline):
    out = CliRunner().invoke(main, ["analyze", "org/lora", "--no-base-discovery", "--format", "csv"])
    assert out.exit_code == 0, out.output
    assert "relative_norm" not in out.output


def test_weight_files_download_only_what_is_read(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    files = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model-00003-of-00003.safetensors",
             "pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.safetensors",
             "tokenizer.json", "optimizer.pt"]
    assert sources.weight_files(files, tmp_path) == ["model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors"]
    assert sources.weight_files(["pytorch_model.bin", "training_args.bin"], None) == ["pytorch_model.bin"]


def test_an_existing_path_wins_over_an_id(tmp_path, monkeypatch, llama_lora):
    adapter, _ = llama_lora
    monkeypatch.chdir(adapter.parent.parent)
    rel = f"{adapter.parent.name}/{adapter.name}"
    assert sources.split_id(rel) is not None and not sources.is_hub_id(rel)
    assert len(deltaspec.load(rel)) == 14


@pytest.fixture
def unreachable_hub(hub, monkeypatch, tmp_path):
    """Online mode, an empty cache, and a Hub endpoint nothing listens on."""
    from huggingface_hub import constants

    for var in sources.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setattr(sources, "_REACHABLE", {})
    return hub[0]


def test_an_unreachable_hub_fails_at_once_naming_the_id(unreachable_hub):
    """No retries against a dead network: one line naming the id and how to fetch it."""
    with pytest.raises(CheckpointError, match=r"org/missing: checkpoint is not cached .* cannot be "
                                              r"reached; fetch it where it can with: hf download"):
        deltaspec.load("org/missing")
    assert sources._REACHABLE == {"127.0.0.1:9": False}


def test_discovery_with_an_unreachable_hub_is_one_note(unreachable_hub, tmp_path):
    """An adapter naming an uncached Hub base, offline in fact: one note, then no base."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in unreachable_hub["lora"].iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path":
                                                                   "org/elsewhere"}))
    with pytest.warns(DeltaspecWarning) as notes:
        df = deltaspec.analyze(adapter)
    texts = [str(n.message) for n in notes]
    assert len(texts) == 1 and "org/elsewhere" in texts[0] and "does not download" in texts[0]
    assert "relative_norm" not in df.columns or df["relative_norm"].isna().all()
