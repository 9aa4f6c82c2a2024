"""A small causal transformer (nanoGPT-sized, Llama-shaped) for the training reference.

Pre-norm decoder blocks with RMSNorm, rotary position embeddings, multi-head causal attention and a
SwiGLU MLP, no biases, untied input and output embeddings. Module names follow Llama, so the state
dict reads ``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, ``model.layers.{i}.input_layernorm.weight``,
``model.layers.{i}.post_attention_layernorm.weight``, ``model.norm.weight`` and ``lm_head.weight``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of the reference model. Defaults: ~0.85 M parameters, trainable in minutes on 2
    CPU cores, large enough to learn the synthetic mixture of :mod:`deltaspec.reference.data`."""

    # Size of the character vocabulary of data.CharTokenizer (3 special tokens + 77 characters).
    vocab_size: int = 80
    # 128 wide: big enough for 7 tasks and ~50 facts, small enough for ~10k tokens/s on 2 cores.
    hidden_size: int = 128
    # 4 blocks: enough depth for copy/reverse/sort circuits (>= 2 attention layers) and recall.
    num_hidden_layers: int = 4
    # 4 heads of width 32: several parallel lookups per layer with a usable head size.
    num_attention_heads: int = 4
    # SwiGLU hidden size ≈ 8/3 · 128 rounded up to a multiple of 32, as Llama does.
    intermediate_size: int = 352
    # Longest sequence: the longest mixture example is ~75 characters; 128 leaves room.
    max_position_embeddings: int = 128
    # RMSNorm epsilon as in Llama.
    rms_norm_eps: float = 1e-5
    # RoPE base as in Llama; sequences here are far shorter than its wavelength range.
    rope_theta: float = 10000.0
    # Std of the normal init of every weight matrix (GPT-2 / Llama convention).
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the head size must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """Plain-JSON form of the config."""
        return asdict(self)


class RMSNorm(nn.Module):
    """y = x / rms(x) · w (Llama's RMSNorm, computed in float32)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rope_tables(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin tables of shape (seq_len, head_dim) for rotary embeddings (half-split form)."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(half, device=device).float() / half)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by the position angles (rotate-half convention of Llama)."""
    x1, x2 = x.chunk(2, dim=-1)  # each (B, H, T, hd/2)
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, T, hd)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary position embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.h, self.hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, T, d) → (B, T, d); ``mask`` (B, 1, T, T) bool (True = may attend) or None."""
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.h, self.hd).transpose(1, 2)  # (B, T, d) → (B, H, T, hd)

        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, H, T, hd) → (B, T, d)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) → (B, T, d)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, T, d) → (B, T, d)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (the ``model.`` prefix of the keys)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeltaspecReferenceLM(nn.Module):
    """The causal language model: ``model`` (backbone) and an untied ``lm_head``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for ``input_ids`` (B, T).

        ``attention_mask`` (B, T), 1 for real tokens and 0 for padding, is only needed for left
        padding (generation); right padding never influences earlier positions of a causal model.
        Rotary embeddings depend only on relative positions, so left padding changes nothing else.
        """
        b, t = input_ids.shape
        if t > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {t} tokens exceeds max_position_embeddings")
        cos, sin = rope_tables(self.config, t, input_ids.device)
        mask = None
        if attention_mask is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            keys = attention_mask.bool()[:, None, None, :]  # (B, T) → (B, 1, 1, T)
            mask = causal[None, None] & keys  # (B, 1, T, T)
            # A padding query would see no key at all (NaN softmax): let it see itself.
            mask = mask | torch.eye(t, dtype=torch.bool, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x))  # (B, T, vocab)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> list[list[int]]:
    """Greedy completions (without the prompt, cut at EOS) of a batch of token-id prompts.

    ``model(input_ids, attention_mask)`` must return logits (B, T, V). Prompts are left-padded.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        att[i, width - len(p) :] = 1
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        nxt = model(ids, att)[:, -1, :].argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        new.append(nxt)
        done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)  # (B, T) → (B, T + 1)
        att = torch.cat([att, torch.ones_like(nxt)[:, None]], dim=1)
        if bool(done.all()):
            break
    out = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
    return [row[: row.index(eos_id)] if eos_id in row else row for row in out]
