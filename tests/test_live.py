"""Live objects in a notebook: a PeftModel, nn.Modules and state dicts give the on-disk results.

The models are built with transformers + peft from tiny configs; every on-disk twin is the same
object saved with save_pretrained. Tolerance 1e-6, as the issue asks.
"""

from __future__ import annotations

import copy

import factories as F
import numpy as np
import pandas as pd
import pytest
import torch

import deltaspec
from deltaspec.errors import DeltaspecError, UsageError

TOL = 1e-6


def _close(live: pd.DataFrame, disk: pd.DataFrame) -> None:
    live, disk = pd.DataFrame(live), pd.DataFrame(disk)
    assert list(live.columns) == list(disk.columns)
    assert list(live["module"]) == list(disk["module"])
    num = [c for c in live.columns if pd.api.types.is_numeric_dtype(disk[c])]
    other = [c for c in live.columns if c not in num]
    pd.testing.assert_frame_equal(live[other], disk[other])
    np.testing.assert_allclose(live[num].to_numpy(float), disk[num].to_numpy(float),
                               rtol=TOL, atol=TOL, equal_nan=True)


def test_peft_model_equals_its_saved_adapter(llama, llama_lora):
    _, base = llama
    adapter, pm = llama_lora
    _close(deltaspec.analyze(pm), deltaspec.analyze(adapter, base=base))
    _close(deltaspec.analyze(pm, discover_base=False), deltaspec.analyze(adapter, discover_base=False))


def test_adapter_name_chooses_and_the_active_one_is_the_default(llama, tmp_path):
    model, base = llama
    folder, pm = F.peft_adapter(model, tmp_path / "a", r=4, target_modules=["q_proj", "v_proj"],
                                use_dora=True, modules_to_save=["lm_head"])
    from peft import LoraConfig

    pm.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "b")
    _close(deltaspec.analyze(pm), deltaspec.analyze(folder, base=base))
    _close(deltaspec.analyze(pm, adapter_name="other"),
           deltaspec.analyze(tmp_path / "b" / "other", base=base))
    pm.set_adapter("other")
    assert set(deltaspec.analyze(pm)["kind"]) == {"k_proj"}
    with pytest.raises(UsageError, match="adapter_name='nope'.*default, other"):
        deltaspec.analyze(pm, adapter_name="nope")


def test_a_merged_model_is_refused_not_misread(llama, tmp_path):
    model, _ = llama
    _, pm = F.lora_adapter(model, tmp_path / "m", r=4, target_modules=["q_proj"])
    before = deltaspec.analyze(pm)
    pm.merge_adapter()
    with pytest.raises(UsageError, match="merged into the base weights.*unmerge_adapter"):
        deltaspec.analyze(pm)
    pm.unmerge_adapter()
    _close(deltaspec.analyze(pm), before)


def test_adapter_state_dict_with_its_config(llama_lora):
    from peft import get_peft_model_state_dict

    adapter, pm = llama_lora
    state = get_peft_model_state_dict(pm)
    _close(deltaspec.analyze(state, config=pm.peft_config["default"]),
           deltaspec.analyze(adapter, discover_base=False))
    with pytest.raises(UsageError, match="config"):
        deltaspec.analyze(state)


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory, gpt2):
    """(base module, fine-tuned module, base folder, fine-tuned folder): tied head, Conv1D."""
    base_model, base = gpt2
    ft_folder = F.full_finetune(base_model, tmp_path_factory.mktemp("gpt2_ft"))
    from transformers import GPT2LMHeadModel

    return base_model, GPT2LMHeadModel.from_pretrained(ft_folder).eval(), base, ft_folder


def test_modules_compare_and_analyze_like_their_folders(gpt2_pair):
    base_m, ft_m, base, ft = gpt2_pair
    _close(deltaspec.compare(base_m, ft_m), deltaspec.compare(base, ft))
    _close(deltaspec.analyze(ft_m, base=base_m), deltaspec.analyze(ft, base=base))
    _close(deltaspec.analyze(ft_m, base=base), deltaspec.analyze(ft, base=base))


def test_state_dicts_with_other_prefixes_pair(llama, llama_full):
    model, base = llama
    from transformers import LlamaForCausalLM

    ft_m = LlamaForCausalLM.from_pretrained(llama_full).eval()
    disk = deltaspec.analyze(llama_full, base=base, include="layers")
    bare = model.model.state_dict()  # a LlamaModel's keys: no "model." prefix
    _close(deltaspec.analyze(ft_m.state_dict(), base=bare, include="layers"), disk)


def test_no_copies_of_the_parameters(llama_lora):
    _, pm = llama_lora
    deltas = deltaspec.load(pm)
    name = "model.layers.0.self_attn.q_proj"
    b, a = deltas[name]._factors()  # the thunk as the loader built it: B·s and A
    lora_a = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.data_ptr() == lora_a.data_ptr()
    w = deltas[name].base()
    assert w.data_ptr() == pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.data_ptr()


def test_bad_objects_are_one_line(llama):
    model, _ = llama
    with pytest.raises(DeltaspecError, match="expected a path, a Hub id"):
        deltaspec.analyze(42)
    with pytest.raises(DeltaspecError, match="a full model gives an update only against its base"):
        deltaspec.analyze(copy.deepcopy(model))
    with pytest.raises(DeltaspecError, match="expected a path, a Hub id"):
        deltaspec.analyze({"a": 1})
    assert torch.is_tensor(next(iter(model.state_dict().values())))
