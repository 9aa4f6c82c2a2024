"""MultiLoRA loader: ΔW = Σᵢ sᵢ·Bᵢ·Aᵢ·α/r against an independent float64 computation."""

from __future__ import annotations

import json

import factories as F
import pytest
import torch

import deltaspec
from deltaspec.errors import CheckpointError, ConfigError

MODULES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.mlp.down_proj": (32, 48),
           "model.layers.1.mlp.up_proj": (48, 32)}


def reference(t: dict, alpha: float, r: int) -> torch.Tensor:
    """Σᵢ sᵢ ⊙ (Bᵢ Aᵢ) · α/r in float64, module by module (sᵢ a scalar or a per-row vector)."""
    a, b, s = t["A"], t["B"], t["scaling"]
    total = torch.zeros(b.shape[1], a.shape[2], dtype=torch.float64)
    for i in range(a.shape[0]):
        si = s[i].reshape(-1, 1) if s.ndim == 2 else s[i]
        total += si * (b[i] @ a[i])
    return total * alpha / r


@pytest.mark.parametrize(("scaling", "style"), [("n", "reference"), ("out", "reference"),
                                                ("out", "mtl"), ("n", "mtl")])
def test_multilora_matches_float64_sum(tmp_path, scaling, style):
    n, r, alpha = 3, 2, 6.0
    kw = {"prefix": "base_model.model.", "leaf": ".weight",
          "weights_name": "adapter_model.safetensors"} if style == "mtl" else {}
    tensors = F.multilora_folder(tmp_path, MODULES, n=n, r=r, alpha=alpha, scaling=scaling, **kw)
    deltas = deltaspec.load(tmp_path)
    assert deltas.format == "multilora" and set(deltas) == set(MODULES)
    for name, d in deltas.items():
        want = reference(tensors[name], alpha, r)
        assert d.is_factored and d.method == "multilora"
        assert d.shape == MODULES[name] == tuple(want.shape)
        assert d.rank_bound == min(n * r, *d.shape) <= n * r
        b, a = d.factors(torch.float64)
        assert b.shape == (d.shape[0], n * r) and a.shape == (n * r, d.shape[1])
        err = float((d.dense(torch.float64) - want).norm() / want.norm())
        assert err < 1e-6, (name, err)


def test_multilora_with_base(tmp_path, llama):
    model, base = llama
    tensors = F.multilora_folder(tmp_path / "m", MODULES, n=2, r=3, alpha=3.0)
    deltas = deltaspec.load(tmp_path / "m", base)
    sd = model.state_dict()
    for name, d in deltas.items():
        assert torch.equal(d.base(), sd[name + ".weight"])
        want = reference(tensors[name], 3.0, 3)
        assert float((d.dense(torch.float64) - want).norm() / want.norm()) < 1e-6


def test_multilora_from_reference_layers(tmp_path):
    """The bundled training reference's export reads back as its own delta_weight()."""
    from deltaspec.reference.export import save_multilora
    from deltaspec.reference.layers import MultiLoRALinear

    torch.manual_seed(0)
    layers = {}
    for name, (d_out, d_in) in MODULES.items():
        layer = MultiLoRALinear(torch.nn.Linear(d_in, d_out), n=3, r=2, alpha=4.0, scaling_shape="n_out")
        with torch.no_grad():
            layer.lora_scaling.normal_()
        layers[name] = layer
    save_multilora(layers, tmp_path, "tiny", sorted({k.rsplit(".", 1)[-1] for k in MODULES}))
    deltas = deltaspec.load(tmp_path)
    for name, layer in layers.items():
        want = layer.delta_weight().detach().to(torch.float64)
        assert float((deltas[name].dense(torch.float64) - want).norm() / want.norm()) < 1e-6


def test_config_must_agree_with_tensors(tmp_path):
    F.multilora_folder(tmp_path, MODULES, n=3, r=2)
    config = json.loads((tmp_path / "multilora_config.json").read_text())
    (tmp_path / "multilora_config.json").write_text(json.dumps(config | {"r": 4}))
    with pytest.raises(ConfigError, match=r"multilora_config\.json.*r=4"):
        deltaspec.load(tmp_path)
    (tmp_path / "multilora_config.json").write_text(json.dumps(config | {"lora_alpha": "x"}))
    with pytest.raises(ConfigError, match="lora_alpha"):
        deltaspec.load(tmp_path)


def test_missing_part_names_the_module(tmp_path):
    from safetensors.torch import load_file, save_file

    F.multilora_folder(tmp_path, MODULES)
    path = tmp_path / "multilora_model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.lora_scaling"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj.*lora_scaling"):
        deltaspec.load(tmp_path)
