"""Shared fixtures: tiny genuine checkpoints (built once per session) and the GPU skip rule."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Hermetic by configuration, set once before anything imports huggingface_hub (which reads these
# at import): a temporary Hugging Face cache, the Hub offline, deltaspec's own caches (solver
# calibration, the demo's pretrained base) in the same temporary folder — nothing under ~.
_CACHE = tempfile.mkdtemp(prefix="deltaspec-tests-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.update({"HF_HOME": os.path.join(_CACHE, "hf"), "HF_HUB_CACHE": os.path.join(_CACHE, "hf", "hub"),
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "DELTASPEC_CACHE_DIR": os.path.join(_CACHE, "deltaspec"),
                   "DELTASPEC_CACHE": os.path.join(_CACHE, "deltaspec-demo")})

import factories as F  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# The solver routes are chosen by measuring on a user's machine; tests check each route by name
# instead (tests/test_solvers.py), so every test run takes the same, documented default.
os.environ["DELTASPEC_SOLVER"] = "rule"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """(model, base folder) of a tiny random Llama."""
    model = F.tiny_llama()
    return model, F.save_model(model, tmp_path_factory.mktemp("llama_base"))


@pytest.fixture(scope="session")
def llama_lora(tmp_path_factory, llama):
    """(adapter folder, PeftModel) of a rank-4 LoRA on every linear layer of the tiny Llama."""
    model, _ = llama
    return F.lora_adapter(model, tmp_path_factory.mktemp("llama_lora"), r=4, lora_alpha=8,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"])


@pytest.fixture(scope="session")
def llama_full(tmp_path_factory, llama):
    """A full fine-tune of the tiny Llama (dense random updates)."""
    model, _ = llama
    return F.full_finetune(model, tmp_path_factory.mktemp("llama_full"))


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    """(model, base folder) of a tiny random GPT-2 (Conv1D layers)."""
    model = F.tiny_gpt2()
    return model, F.save_model(model, tmp_path_factory.mktemp("gpt2_base"))


@pytest.fixture
def one_thread():
    """Small matrices: one intra-op thread (no OpenMP barrier storms on a shared 2-core CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store_reads(monkeypatch):
    """The keys read through TensorStore.get, in order (to check that loading is lazy)."""
    from deltaspec.loaders.store import TensorStore

    calls: list[str] = []
    real = TensorStore.get

    def counting(self, key):
        calls.append(key)
        return real(self, key)

    monkeypatch.setattr(TensorStore, "get", counting)
    return calls
