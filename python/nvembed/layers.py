"""nn.Module faces of the ops."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class _GEGLU(nn.Module):
    """Parameter-free placeholder that keeps the release's `net.{0,1,2}` numbering (net.1 = GEGLU)."""

    def forward(self, x):  # pragma: no cover - the fused op computes it
        a, gates = x.chunk(2, dim=-1)
        return a * nn.functional.gelu(gates)


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), _GEGLU(), nn.Linear(dim * mult, dim))


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, eps: float, context_dim: Optional[int] = None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim, eps=eps)
        if context_dim is not None:
            self.norm_context = nn.LayerNorm(context_dim, eps=eps)


class LatentAttentionPooling(nn.Module):
    """NV-Embed's latent-attention pooling layer, fused (torch.ops.nvembed.latent_pool).

    The token states [B, L, d] are the queries of a PreNorm cross-attention over `num_latents` trained latents
    (residual), then a PreNorm GEGLU feed-forward (residual), then the mean over the tokens with pool_mask == 1
    (None = all tokens; an all-zero row gives 0) and, with `normalize`, L2 normalization -> [B, d].

    Parameter names follow NV-Embed-v2's `latent_attention_model.*` (prefix stripped), so the released weights
    load with `load_state_dict` directly.
    """

    def __init__(self, hidden_dim: int = 4096, num_latents: int = 512, num_heads: int = 8, dim_head: int = 4096,
                 ff_mult: int = 4, normalize: bool = True, eps: float = 1e-5):
        super().__init__()
        for name, value in (("hidden_dim", hidden_dim), ("num_latents", num_latents), ("num_heads", num_heads),
                            ("dim_head", dim_head), ("ff_mult", ff_mult)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LatentAttentionPooling: {name} must be an int >= 1, got {value!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"LatentAttentionPooling: normalize must be True or False, got {normalize!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"LatentAttentionPooling: eps must be a finite number > 0, got {eps!r}")
        self.hidden_dim = hidden_dim
        self.num_latents = num_latents
        self.num_heads = num_heads
        self.dim_head = dim_head
        self.ff_mult = ff_mult
        self.normalize = normalize
        self.eps = eps
        self.cross_attend_blocks = nn.ModuleList([
            _PreNorm(hidden_dim, _CrossAttention(hidden_dim, num_heads, dim_head), eps, context_dim=hidden_dim),
            _PreNorm(hidden_dim, _FeedForward(hidden_dim, ff_mult), eps),
        ])
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_dim))

    @classmethod
    def from_config(cls, config: dict, **kwargs) -> "LatentAttentionPooling":
        """Build from the released LatentAttentionConfig fields (a dict, e.g. config.json's latent_attention_config)."""
        cfg = dict(config)
        latent_dim = cfg.get("latent_dim", 4096)
        hidden_dim = cfg.get("hidden_dim", 4096)
        if latent_dim != hidden_dim:
            raise ValueError(f"LatentAttentionPooling: latent_dim ({latent_dim}) must equal hidden_dim ({hidden_dim}) "
                             "(the released layer applies norm(latent_dim) to the token states)")
        fields = dict(hidden_dim=hidden_dim, num_latents=cfg.get("num_latents_value", 512),
                      num_heads=cfg.get("num_cross_heads", 8), dim_head=cfg.get("cross_dim_head", 4096),
                      normalize=cfg.get("output_normalize", True))
        return cls(**{**fields, **kwargs})  # keyword arguments override the config's fields

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, num_latents={self.num_latents}, num_heads={self.num_heads}, "
                f"dim_head={self.dim_head}, ff_mult={self.ff_mult}, normalize={self.normalize}")

    def op_weights(self):
        """The parameters in nvembed::latent_pool's (and latent_pool_ref's) argument order, after pool_mask."""
        attn, ff = self.cross_attend_blocks
        return (self.latents, attn.norm.weight, attn.norm.bias, attn.norm_context.weight, attn.norm_context.bias,
                attn.fn.to_q.weight, attn.fn.to_kv.weight, attn.fn.to_out.weight, ff.norm.weight, ff.norm.bias,
                ff.fn.net[0].weight, ff.fn.net[0].bias, ff.fn.net[2].weight, ff.fn.net[2].bias)

    def forward(self, hidden_states: torch.Tensor, pool_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.ops.nvembed.latent_pool(hidden_states, pool_mask, *self.op_weights(), self.num_heads,
                                             self.normalize, self.eps)
