"""Full fine-tune loader: ΔW = fine-tuned − base, every HF layout, prefixes, tied heads, laziness."""

from __future__ import annotations

import copy
import json

import factories as F
import pytest
import torch
from safetensors.torch import load_file

import deltaspec
from deltaspec.errors import CheckpointError, ShapeError


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}


def finetuned(model, seed: int = 1):
    """A copy of ``model`` with every 2-D parameter moved (tied ones once)."""
    g = torch.Generator().manual_seed(seed)
    ft = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in ft.named_parameters():
            if p.ndim == 2:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return ft


def assert_exact(deltas, ft_sd: dict, base_sd: dict, pairs: dict[str, tuple[str, str]]) -> None:
    """Every delta is exactly ft − base (float32), for the (ft key, base key) pairs given."""
    assert set(deltas) == set(pairs)
    for name, (fk, bk) in pairs.items():
        want = ft_sd[fk] - base_sd[bk]
        assert deltas[name].method == "full" and not deltas[name].is_factored
        assert torch.equal(deltas[name].dense(), want), name


def same_name_pairs(sd: dict) -> dict[str, tuple[str, str]]:
    return {k.removesuffix(".weight"): (k, k) for k, v in sd.items() if v.ndim == 2}


@pytest.fixture(scope="module")
def llama_ft(llama):
    return finetuned(llama[0])


@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "bin_sharded"])
def test_layouts_give_exact_differences(tmp_path, llama, llama_ft, layout):
    model, _ = llama
    if layout in ("single", "sharded"):
        kw = {"max_shard_size": "20KB"} if layout == "sharded" else {}
        base, ft = (F.save_model(m, tmp_path / n, **kw) for m, n in ((model, "b"), (llama_ft, "f")))
    else:
        shards = 3 if layout == "bin_sharded" else 1
        base, ft = (F.save_bin(m, tmp_path / n, shards) for m, n in ((model, "b"), (llama_ft, "f")))
    index = {"sharded": "model.safetensors.index.json", "bin_sharded": "pytorch_model.bin.index.json"}
    if layout in index:
        assert (ft / index[layout]).is_file() and len(json.loads((ft / index[layout]).read_text())
                                                      ["weight_map"]) > 10
    deltas = deltaspec.load(ft, base)
    assert deltas.format == "full"
    assert_exact(deltas, state(llama_ft), state(model), same_name_pairs(state(model)))
    one_d = {k for k, v in state(model).items() if v.ndim == 1}
    assert {k for k, why in deltas.skipped if why == "1-D tensor"} == one_d


def test_full_needs_a_base(llama_full):
    with pytest.raises(CheckpointError, match="needs its base"):
        deltaspec.load(llama_full)


def test_base_may_be_a_weights_file(tmp_path, llama, llama_full):
    model, base = llama
    deltas = deltaspec.load(llama_full, base / "model.safetensors")
    assert len(deltas) == len(same_name_pairs(state(model)))


def test_prefix_drift_bare_base(tmp_path, llama, llama_ft):
    """A base saved as bare LlamaModel (``layers.*``) pairs with a ForCausalLM (``model.layers.*``)."""
    model, _ = llama
    base = F.save_model(model.model, tmp_path / "bare")
    assert "layers.0.self_attn.q_proj.weight" in load_file(str(base / "model.safetensors"))
    ft = F.save_model(llama_ft, tmp_path / "ft")
    deltas = deltaspec.load(ft, base)
    pairs = {k.removesuffix(".weight"): (k, k.removeprefix("model."))
             for k, v in state(llama_ft).items() if v.ndim == 2 and k != "lm_head.weight"}
    assert_exact(deltas, state(llama_ft), state(model.model), pairs)
    assert ("lm_head.weight", "not in the base checkpoint") in deltas.skipped
    # and the other way round: a bare fine-tune against a full base
    bare_ft = deltaspec.load(F.save_model(llama_ft.model, tmp_path / "bare_ft"),
                             F.save_model(model, tmp_path / "b"))
    assert set(bare_ft) == {k.removeprefix("model.") for k in pairs}


def test_prefix_drift_gpt2(tmp_path, gpt2):
    model, _ = gpt2
    ft_model = finetuned(model)
    base = F.save_model(model.transformer, tmp_path / "bare")
    ft = F.save_model(ft_model, tmp_path / "ft")
    deltas = deltaspec.load(ft, base)
    assert "transformer.h.0.attn.c_attn" in deltas and "lm_head" not in deltas  # tied, not saved
    d = deltas["transformer.h.0.attn.c_attn"]
    want = (state(ft_model)["transformer.h.0.attn.c_attn.weight"]
            - state(model)["transformer.h.0.attn.c_attn.weight"]).T
    assert d.shape == (96, 32) and torch.equal(d.dense(), want)


@pytest.mark.parametrize("config", [True, False])
def test_gpt2_full_and_lora_pair_by_name_and_shape(tmp_path, gpt2, config):
    """Conv1D weights are canonicalised to (out, in), with or without config.json."""
    model, base = gpt2
    ft = F.full_finetune(model, tmp_path / "ft")
    folder, _ = F.lora_adapter(model, tmp_path / "lora", r=4, target_modules=["c_attn", "c_proj", "c_fc"])
    if not config:
        bare_base = tmp_path / "base"
        bare_base.mkdir()
        (bare_base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
        (ft / "config.json").unlink()
        base = bare_base
    full, lora = deltaspec.load(ft, base), deltaspec.load(folder, base)
    assert len(lora) == 8
    for name, d in lora.items():
        assert full[name].shape == d.shape, name
        assert torch.equal(full[name].base(), d.base()), name
    conv = {n: d.shape for n, d in full.items() if n.rsplit(".", 1)[-1] in F.CONV1D_KINDS}
    assert conv["transformer.h.1.mlp.c_fc"] == (128, 32) and conv["transformer.h.1.mlp.c_proj"] == (32, 128)
    assert full["transformer.wte"].shape == (64, 32)  # embeddings are not Conv1D
    df = deltaspec.compare(folder, ft, base=base, intruders=False)
    assert len(df) == 8


def _llama(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def _retie(model, tied: bool):
    """The same weights in a model whose head is (un)tied."""
    other = _llama(tied)
    sd = model.state_dict()
    if "lm_head.weight" not in sd or tied:
        sd = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}
    other.load_state_dict(sd, strict=False)
    return other


@pytest.mark.parametrize(("base_tied", "ft_tied"), [(True, True), (True, False), (False, True)])
def test_tied_heads(tmp_path, base_tied, ft_tied):
    base_model = _llama(base_tied)
    ft_model = finetuned(_retie(base_model, ft_tied))
    base, ft = F.save_model(base_model, tmp_path / "b"), F.save_model(ft_model, tmp_path / "f")
    for folder, tied in ((base, base_tied), (ft, ft_tied)):
        assert ("lm_head.weight" in load_file(str(folder / "model.safetensors"))) is not tied
    deltas = deltaspec.load(ft, base)
    bsd, fsd = state(base_model), state(ft_model)
    head = "lm_head.weight" if not ft_tied else "model.embed_tokens.weight"
    base_head = "lm_head.weight" if not base_tied else "model.embed_tokens.weight"
    if base_tied and ft_tied:
        assert "lm_head" not in deltas
    else:
        assert torch.equal(deltas["lm_head"].dense(), fsd[head] - bsd[base_head])
    assert torch.equal(deltas["model.embed_tokens"].dense(),
                       fsd["model.embed_tokens.weight"] - bsd["model.embed_tokens.weight"])
    assert not [k for k, why in deltas.skipped if "base" in why]


def test_shape_mismatch_names_the_tensor(tmp_path, llama_full):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=False))
    base = F.save_model(other, tmp_path / "b")
    with pytest.raises(ShapeError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(32, 48\).*\(32, 40\)"):
        deltaspec.load(llama_full, base)


def test_lazy_until_asked(llama, llama_full, store_reads):
    calls = store_reads
    deltas = deltaspec.load(llama_full, llama[1])
    assert calls == [] and len(deltas) == 16
    deltas["model.layers.1.mlp.up_proj"].dense()
    assert calls == ["model.layers.1.mlp.up_proj.weight"] * 2


def test_a_base_of_another_model_is_refused(llama_full, gpt2):
    """A Llama fine-tune against a GPT-2 base pairs almost nothing: an error naming the base,
    not a one-row analysis of whatever happens to share a name and shape."""
    import pytest

    from deltaspec import load
    from deltaspec.errors import CheckpointError

    with pytest.raises(CheckpointError, match="counterpart in this base"):
        load(llama_full, base=gpt2[1])
