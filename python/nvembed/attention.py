"""The "nvembed" attention backend for Hugging Face transformers: every self-attention runs non-causally on
torch.ops.nvembed.flash_attn, keyed only by the padding mask.

Two registrations under the same name:
- AttentionInterface "nvembed": the attention function, (module, q [B,H,L,D], k, v [B,Hkv,L,D], mask, ...)
  -> ([B,L,H,D], None). K/V heads go in un-repeated (the kernel does GQA natively).
- AttentionMaskInterface "nvembed": the mask builder transformers calls from create_causal_mask /
  create_bidirectional_mask / create_sliding_window_causal_mask. It returns the 2-D key padding mask itself
  [B, Lk] (bool, True = attend) or None, so no causal or sliding-window part and no B x L x L mask is ever
  built. This is what makes decoder backbones (Mistral, Llama, Qwen2) bidirectional, as NV-Embed's
  BidirectionalMistralModel does with its 4-D padding-only mask; `make_bidirectional` additionally clears the
  causal flags so the model stays non-causal if someone switches it back to another backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTN_IMPLEMENTATION = "nvembed"


def nvembed_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                         mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """Mask builder: the 2-D bool key padding mask (the last kv_length columns), ignoring mask_function
    (causal / sliding window); None when no padding mask was given."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)


def _key_padding_mask(attention_mask: Optional[torch.Tensor], batch: int, kv_length: int):
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        mask = attention_mask[:, -kv_length:]
        return mask if mask.dtype == torch.bool else mask != 0
    if attention_mask.dim() == 4:
        # A caller-prepared [B, 1|H, Lq, Lk] mask (transformers passes 4-D masks through untouched). For padding,
        # causal and sliding-window masks alike, key j is a real token iff some query row may attend to it (the
        # diagonal), so the key padding is the any-reduction; any other structure is dropped (non-causal). Columns
        # past kv_length are cut off as transformers' eager attention cuts them ([..., :kv_length]).
        attention_mask = attention_mask[..., :kv_length]
        if attention_mask.dtype == torch.bool:
            allowed = attention_mask
        else:
            # additive: 0 = attend; a bias of -1e3 or below is a masked key under softmax (exp(-1000) is 0 in every
            # float type): transformers' finfo.min and the legacy (1 - mask) * -10000.0 alike
            allowed = attention_mask > -1e3
        return allowed.any(dim=2).any(dim=1).expand(batch, kv_length)
    raise ValueError(f"nvembed attention: attention_mask must be 2-D [B, Lk] or 4-D [B, 1, Lq, Lk], "
                     f"got shape {tuple(attention_mask.shape)}")


def nvembed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                              dropout: float = 0.0, **kwargs):
    if dropout and dropout > 0.0:
        raise ValueError(f"nvembed attention: attention dropout ({dropout}) is not supported; set the backbone's "
                         "attention dropout (attention_dropout / attention_probs_dropout_prob) to 0")
    if kwargs.get("output_attentions"):
        raise ValueError("nvembed attention: output_attentions=True is not supported (no weights are formed)")
    if key.shape[2] != query.shape[2]:
        raise ValueError("nvembed attention: a KV cache / cross-attention length "
                         f"(Lq={query.shape[2]}, Lk={key.shape[2]}) is not supported; call with use_cache=False")
    batch, kv_length = key.shape[0], key.shape[2]
    mask = _key_padding_mask(attention_mask, batch, kv_length)
    if mask is not None:
        mask = mask.to(device=query.device).contiguous()
    if query.is_cuda and query.dtype not in (torch.bfloat16, torch.float16):
        return sdpa_key_padding_attention(query, key, value, mask, scaling), None
    out = torch.ops.nvembed.flash_attn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask,
                                       scaling)
    return out, None


def sdpa_key_padding_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               mask: Optional[torch.Tensor], scaling: Optional[float] = None) -> torch.Tensor:
    """flash_attn's semantics (non-causal; key padding mask [B, Lk], True = attend; GQA; a batch row without keys
    gives 0) through PyTorch's SDPA, for what our CUDA kernels do not take: float32 (and float64) on CUDA, e.g. a
    model loaded with dtype float32 or an evaluation outside autocast. q [B, H, L, D], k / v [B, Hkv, L, D] as
    transformers passes them; returns [B, L, H, D]."""
    import torch.nn.functional as F

    attn_mask = None
    empty = None
    if mask is not None:
        empty = ~mask.any(dim=1)  # rows without keys: attend to all (no NaN), then 0
        attn_mask = (mask | empty[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out.transpose(1, 2)


def make_bidirectional(backbone: torch.nn.Module) -> torch.nn.Module:
    """Route `backbone` (a transformers PreTrainedModel) through the nvembed backend, non-causally."""
    backbone.config._attn_implementation = ATTN_IMPLEMENTATION
    backbone.config.is_causal = False
    for module in backbone.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg is not backbone.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTN_IMPLEMENTATION
    return backbone


AttentionInterface.register(ATTN_IMPLEMENTATION, nvembed_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, nvembed_padding_mask)
