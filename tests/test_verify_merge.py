"""`deltaspec verify-merge` on genuine merges made by PEFT's merge_and_unload(): a correct merge, the
base saved as "merged", a wrong scale, a bf16 merge, a skipped module, a sharded merge, live
objects, and bad input (exit 2, one line)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from deltaspec.act.verify import COLUMNS, Sums, judge, verify_merge
from deltaspec.cli import main

TARGETS = ["q_proj", "v_proj", "down_proj"]
SKIPPED = "model.layers.1.self_attn.v_proj"
SCALE = 2.5


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def verify(merged, adapter, base):
    r = cli("verify-merge", merged, "--adapter", adapter, "--base", base, "--format", "json")
    rows = json.loads(r.stdout) if r.exit_code in (0, 1) else None
    return r, rows


@pytest.fixture(scope="module")
def merges(tmp_path_factory, llama):
    """Folders: adapter, merged, merged_bf16, scaled (c = SCALE), skipped (SKIPPED left as the
    base), sharded; and the live (merged model, PeftModel)."""
    from peft import LoraConfig, get_peft_model

    model, _ = llama
    root = tmp_path_factory.mktemp("merges")
    torch.manual_seed(7)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                         target_modules=TARGETS))
    pm.save_pretrained(root / "adapter")
    merged = copy.deepcopy(pm).merge_and_unload()
    merged.save_pretrained(root / "merged")
    merged.save_pretrained(root / "sharded", max_shard_size="30KB")
    copy.deepcopy(merged).to(torch.bfloat16).save_pretrained(root / "merged_bf16")
    scaled = copy.deepcopy(pm)
    for mod in scaled.modules():
        if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "default" in mod.scaling:
            mod.scaling["default"] *= SCALE  # the α/r mistake
    scaled.merge_and_unload().save_pretrained(root / "scaled")
    skipped = copy.deepcopy(merged)
    with torch.no_grad():
        skipped.get_submodule(SKIPPED).weight.copy_(model.get_submodule(SKIPPED).weight)
    skipped.save_pretrained(root / "skipped")
    return root, merged, pm


def test_a_correct_merge_holds(merges, llama):
    root, _, _ = merges
    r, rows = verify(root / "merged", root / "adapter", llama[1])
    assert r.exit_code == 0, r.output
    assert len(rows) == 6 and all(x["verdict"] == "merged" and x["holds"] for x in rows)
    assert all(0 <= x["residual"] <= x["bound"] and x["dtype"] == "float32" for x in rows)
    assert all(abs(x["scale"] - 1) < 1e-5 for x in rows)
    table = cli("verify-merge", root / "merged", "--adapter", root / "adapter", "--base", llama[1])
    assert table.exit_code == 0 and "merged" in table.stdout and "residual" in table.stdout
    assert "all 6 modules hold the adapter" in table.output


def test_the_base_saved_as_merged_is_not_merged(merges, llama):
    root, _, _ = merges
    r, rows = verify(llama[1], root / "adapter", llama[1])
    assert r.exit_code == 1
    assert {x["verdict"] for x in rows} == {"not merged"} and not any(x["holds"] for x in rows)


def test_a_wrong_scale_is_found_with_its_value(merges, llama):
    root, _, _ = merges
    r, rows = verify(root / "scaled", root / "adapter", llama[1])
    assert r.exit_code == 1
    for x in rows:
        assert x["verdict"].startswith("merged with scale ") and not x["holds"]
        assert x["scale"] == pytest.approx(SCALE, abs=1e-3)
        assert float(x["verdict"].rsplit(" ", 1)[1]) == pytest.approx(SCALE, abs=1e-3)


def test_a_bf16_merge_holds_within_the_rounding_bound(merges, llama):
    root, _, _ = merges
    r, rows = verify(root / "merged_bf16", root / "adapter", llama[1])
    assert r.exit_code == 0, r.output
    for x in rows:
        assert x["dtype"] == "bfloat16" and x["verdict"] == "merged"
        assert 1e-5 < x["residual"] <= x["bound"] < 0.05  # rounded: not exact, but bounded


def test_a_skipped_module_fails_and_is_named(merges, llama):
    root, _, _ = merges
    r, rows = verify(root / "skipped", root / "adapter", llama[1])
    assert r.exit_code == 1
    bad = [x for x in rows if not x["holds"]]
    assert [(x["module"], x["verdict"]) for x in bad] == [(SKIPPED, "not merged")]
    table = cli("verify-merge", root / "skipped", "--adapter", root / "adapter", "--base", llama[1])
    assert table.exit_code == 1 and f"e.g. {SKIPPED} (not merged)" in table.output


def test_sharded_merges_and_live_objects(merges, llama):
    root, merged, pm = merges
    assert any(p.name.endswith(".index.json") for p in (root / "sharded").iterdir())
    r, _ = verify(root / "sharded", root / "adapter", llama[1])
    assert r.exit_code == 0, r.output
    checks = verify_merge(merged, pm, llama[0])
    assert len(checks) == 6 and all(c.verdict == "merged" for c in checks)


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr", "ia3", "gpt2-conv1d"])
def test_every_adapter_type_merged_by_peft_holds(kind):
    import factories as F
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

    qv = ["q_proj", "v_proj"]
    model = F.tiny_gpt2() if kind == "gpt2-conv1d" else F.tiny_llama()
    cfg = {"dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                      target_modules=qv),
           "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=qv, init_weights=False),
           "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=qv, init_weights=False),
           "ia3": lambda: IA3Config(target_modules=[*qv, "down_proj"], init_ia3_weights=False,
                                    feedforward_modules=["down_proj"]),
           "gpt2-conv1d": lambda: LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                             target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
           }[kind]()
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():  # IA³ initialises to the identity even with init_ia3_weights=False
        for name, p in pm.named_parameters():
            if "ia3" in name:
                p.add_(0.1 * torch.randn_like(p))
    merged = copy.deepcopy(pm).merge_and_unload()
    checks = verify_merge(merged, pm, model)
    assert checks and all(c.verdict == "merged" and c.residual <= c.bound for c in checks)
    assert all(c.verdict == "not merged" for c in verify_merge(model, pm, model))


def test_hub_ids_and_csv_output(merges, llama, tmp_path, monkeypatch):
    import hubcache

    root, _, _ = merges
    cache = tmp_path / "hub"
    hubcache.add_repo(cache, "org/merged", root / "sharded")
    hubcache.add_repo(cache, "org/base", llama[1])
    hubcache.offline_env(monkeypatch, cache)
    out = tmp_path / "verdicts.csv"
    r = cli("verify-merge", "org/merged", "--adapter", root / "adapter", "--base", "org/base",
            "-o", out, "-q")
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    assert lines[0].split(",") == list(COLUMNS) and len(lines) == 7
    assert all(line.endswith(",merged,True") for line in lines[1:])


def test_the_verdict_rules_by_hand():
    u = 2.0**-24
    # ΔW = 0: M = W holds; M ≠ W beyond W's own rounding does not
    assert judge(Sums(ww=1.0), u)[4] == "merged (ΔW = 0)"
    assert judge(Sums(dd=1e-6, ww=1.0, same=False), u)[4] == "other"
    # M − W = ΔW + noise far above the bound, and not along ΔW: other
    assert judge(Sums(dd=2.0, aa=1.0, da=1.0, rr=1.0, ww=1.0, same=False), u)[4] == "other"


# ---- bad input: exit 2, one line --------------------------------------------------------------

def _copy_with(src, dst, change):
    """A copy of the checkpoint folder ``src`` whose tensors are ``change(state dict)``."""
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    sd = change(load_file(str(src / "model.safetensors")))
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltaspec: error:"), r.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_exits_2_with_one_line(merges, llama, tmp_path):
    root, _, _ = merges
    base, adapter, merged = llama[1], root / "adapter", root / "merged"
    q = "model.layers.0.self_attn.q_proj.weight"
    up = "model.layers.0.mlp.up_proj.weight"

    def run(m, b=base):
        return cli("verify-merge", m, "--adapter", adapter, "--base", b)

    nan = _copy_with(merged, tmp_path / "nan", lambda sd: sd | {q: sd[q].clone().fill_(float("nan"))})
    _one_line_error(run(nan), "NaN", "q_proj")
    quant = _copy_with(merged, tmp_path / "quant", lambda sd: sd | {q: sd[q].to(torch.int8)})
    _one_line_error(run(quant), "quantised", "q_proj")
    fewer = _copy_with(merged, tmp_path / "fewer", lambda sd: {k: v for k, v in sd.items() if k != up})
    _one_line_error(run(fewer), "up_proj")
    wide = _copy_with(merged, tmp_path / "wide", lambda sd: sd | {up: torch.zeros(48, 33)})
    _one_line_error(run(wide), "up_proj", "shape")
    # an adapter module that neither MERGED nor BASE has
    drop = lambda sd: {k: v for k, v in sd.items() if k != q}  # noqa: E731
    _one_line_error(run(_copy_with(merged, tmp_path / "m_noq", drop),
                        _copy_with(base, tmp_path / "b_noq", drop)), "q_proj")
    _one_line_error(run(adapter), "not a merged model")
