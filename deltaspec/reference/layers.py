"""LoRA and MultiLoRA layers that wrap a frozen ``nn.Linear``.

LoRA (Hu et al. 2021): ΔW = B·A·(α/r), A (r × in) Kaiming-uniform with a = √5, B (out × r) zeros.

MultiLoRA (Wang et al. 2023, arXiv 2311.11501): n parallel rank-r modules whose A *and* B are
Kaiming-uniform (a = √5) and whose learnable scaling factors start at zero, so ΔW is exactly zero
at initialisation::

    ΔW = Σᵢ sᵢ·Bᵢ·Aᵢ·(α/r) = [s₁B₁ | … | sₙBₙ] · [A₁; …; Aₙ] · (α/r)

with sᵢ a scalar (scaling shape ``"n"``, tensor (n,)) or a per-output-row vector (scaling shape
``"n_out"``, tensor (n, out), ΔW = Σᵢ diag(sᵢ)·Bᵢ·Aᵢ·(α/r)). The forward pass uses the stacked
factored form, so it costs one rank-(n·r) LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCALING_SHAPES = ("n", "n_out")
MULTILORA_INITS = ("multilora", "lora")


def lora_num_params(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters of one LoRA module of rank ``r``: r·(in + out)."""
    return r * (in_features + out_features)


def multilora_num_params(
    in_features: int, out_features: int, n: int, r: int, scaling_shape: str = "n"
) -> int:
    """Trainable parameters of one MultiLoRA layer: n·r·(in + out) + n (or + n·out)."""
    if scaling_shape not in SCALING_SHAPES:
        raise ValueError(f"scaling_shape must be one of {SCALING_SHAPES}, got {scaling_shape!r}")
    scaling = n if scaling_shape == "n" else n * out_features
    return n * r * (in_features + out_features) + scaling


def _kaiming(t: torch.Tensor) -> None:
    """The Kaiming-uniform initialisation nn.Linear uses (a = √5: bound 1/√fan_in)."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def _frozen(base: nn.Linear) -> nn.Linear:
    """Freeze ``base`` in place (the adapter trains only its own factors) and return it."""
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _merged_linear(base: nn.Linear, delta: torch.Tensor) -> nn.Linear:
    """A plain nn.Linear holding W + ΔW (and a copy of the bias)."""
    out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    out = out.to(device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(base.weight + delta.to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
    return out


class LoRALinear(nn.Module):
    """y = W·x + b + (α/r)·B·A·x with W frozen; A Kaiming-uniform (a = √5), B zeros."""

    def __init__(self, base: nn.Linear, r: int, alpha: float | None = None) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.base = _frozen(base)
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        _kaiming(self.lora_A)

    @property
    def scale(self) -> float:
        """The LoRA scale α/r."""
        return self.alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the low-rank update, computed factored (never forms ΔW)."""
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B·A·(α/r), shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with weight W + ΔW."""
        with torch.no_grad():
            return _merged_linear(self.base, self.delta_weight())

    def num_trainable_parameters(self) -> int:
        """Exact count of parameters with requires_grad (the LoRA factors)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class MultiLoRALinear(nn.Module):
    """y = W·x + b + (α/r)·Σᵢ sᵢ·Bᵢ·Aᵢ·x with W frozen, n modules of rank r, s zero-initialised.

    Tensors: ``lora_A`` (n, r, in), ``lora_B`` (n, out, r), ``lora_scaling`` (n,) or (n, out).
    Every Aᵢ and Bᵢ is initialised like an nn.Linear weight of its own 2-D shape (Kaiming-uniform,
    a = √5), so the bound of Bᵢ is 1/√r and that of Aᵢ is 1/√in.
    """

    def __init__(
        self,
        base: nn.Linear,
        n: int,
        r: int,
        alpha: float | None = None,
        scaling_shape: str = "n",
        init: str = "multilora",
    ) -> None:
        super().__init__()
        if init not in _INITS:
            raise ValueError(f"init must be one of {MULTILORA_INITS}, got {init!r}")
        if n < 1 or r < 1:
            raise ValueError(f"MultiLoRA needs n >= 1 and r >= 1, got n={n}, r={r}")
        if scaling_shape not in SCALING_SHAPES:
            raise ValueError(f"scaling_shape must be one of {SCALING_SHAPES}, got {scaling_shape!r}")
        self.base = _frozen(base)
        self.n, self.r, self.scaling_shape = n, r, scaling_shape
        self.alpha = float(r if alpha is None else alpha)
        w, fin, fout = base.weight, base.in_features, base.out_features
        self.lora_A = nn.Parameter(torch.empty(n, r, fin, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(n, fout, r, device=w.device, dtype=w.dtype))
        scaling = (n,) if scaling_shape == "n" else (n, fout)
        self.lora_scaling = nn.Parameter(torch.zeros(scaling, device=w.device, dtype=w.dtype))
        self.init = init
        with torch.no_grad():
            _INITS[init](self)

    @property
    def scale(self) -> float:
        """The per-module scale α/r."""
        return self.alpha / self.r

    def stacked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_cat, A_cat) with B_cat = [s₁B₁|…|sₙBₙ] (out, n·r), A_cat = [A₁;…;Aₙ] (n·r, in)."""
        sc = self.lora_scaling
        # s (n,) -> (n, 1, 1) scales a whole Bᵢ; s (n, out) -> (n, out, 1) scales its rows.
        s = sc[:, None, None] if self.scaling_shape == "n" else sc[:, :, None]
        scaled_b = self.lora_B * s  # (n, out, r)
        b_cat = scaled_b.permute(1, 0, 2).reshape(self.base.out_features, self.n * self.r)
        a_cat = self.lora_A.reshape(self.n * self.r, self.base.in_features)  # (n·r, in)
        return b_cat, a_cat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the stacked rank-(n·r) update (one pair of matmuls)."""
        b_cat, a_cat = self.stacked_factors()
        return self.base(x) + F.linear(F.linear(x, a_cat), b_cat) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW = Σᵢ sᵢ·Bᵢ·Aᵢ·(α/r), shape (out, in); exactly zero at initialisation."""
        b_cat, a_cat = self.stacked_factors()
        return (b_cat @ a_cat) * self.scale

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with weight W + ΔW."""
        with torch.no_grad():
            return _merged_linear(self.base, self.delta_weight())

    def num_trainable_parameters(self) -> int:
        """Exact count of parameters with requires_grad (A, B and the scaling factors)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _init_multilora(layer: MultiLoRALinear) -> None:
    """The paper's init: every Aᵢ and Bᵢ Kaiming-uniform (per-module 2-D fan-in), scalings 0."""
    for i in range(layer.n):  # fan_in of Aᵢ is `in`, of Bᵢ is r
        _kaiming(layer.lora_A[i])
        _kaiming(layer.lora_B[i])
    layer.lora_scaling.zero_()


def _init_lora(layer: MultiLoRALinear) -> None:
    """LoRA's init in MultiLoRA's shape: Aᵢ Kaiming-uniform, Bᵢ zero, scalings 1 (ΔW = 0 too)."""
    for i in range(layer.n):
        _kaiming(layer.lora_A[i])
    layer.lora_B.zero_()
    layer.lora_scaling.fill_(1.0)


_INITS = {"multilora": _init_multilora, "lora": _init_lora}

AdapterLayer = LoRALinear | MultiLoRALinear


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def target_linear_paths(model: nn.Module, target_modules: list[str] | tuple[str, ...]) -> list[str]:
    """Paths of the nn.Linear modules whose last name component is in ``target_modules``."""
    wanted = set(target_modules)
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in wanted
    ]


def apply_adapters(
    model: nn.Module,
    method: str,
    target_modules: list[str] | tuple[str, ...],
    r: int,
    n: int = 1,
    alpha: float | None = None,
    scaling_shape: str = "n",
    init: str = "multilora",
) -> dict[str, AdapterLayer]:
    """Freeze ``model`` and wrap every targeted nn.Linear in a LoRA or MultiLoRA layer.

    Returns module path (the path of the wrapped nn.Linear, e.g.
    ``model.layers.0.self_attn.q_proj``) → adapter layer. ``method`` is ``"lora"`` or
    ``"multilora"``. The adapter's parameters are the only ones left trainable.
    """
    if method not in ("lora", "multilora"):
        raise ValueError(f"method must be 'lora' or 'multilora', got {method!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    paths = target_linear_paths(model, target_modules)
    if not paths:
        raise ValueError(f"no nn.Linear module matches target_modules {list(target_modules)}")
    layers: dict[str, AdapterLayer] = {}
    for path in paths:
        base = model.get_submodule(path)
        assert isinstance(base, nn.Linear), path  # target_linear_paths keeps nn.Linear only
        layer: AdapterLayer
        if method == "lora":
            layer = LoRALinear(base, r=r, alpha=alpha)
        else:
            layer = MultiLoRALinear(base, n=n, r=r, alpha=alpha, scaling_shape=scaling_shape,
                                    init=init)
        _set_submodule(model, path, layer)
        layers[path] = layer
    return layers


def merge_adapters(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Replace every adapter layer in ``model`` by its merged plain nn.Linear (W + ΔW)."""
    for path, layer in layers.items():
        _set_submodule(model, path, layer.merge())
