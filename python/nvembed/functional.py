"""Plain-function face of the ops."""
from typing import Optional

import torch


def flash_attn(q, k, v, key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """Non-causal attention, q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] -> [B, Lq, Hq, D] (see torch.ops.nvembed)."""
    return torch.ops.nvembed.flash_attn(q, k, v, key_padding_mask, scale)


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                      scale: Optional[float] = None):
    return torch.ops.nvembed.flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               scale)


def infonce(queries, docs, group_size: int, temperature: float, in_batch_negatives: bool = True):
    """Mean InfoNCE loss over grouped docs, tiled (never materializes the B x B*G logits)."""
    return torch.ops.nvembed.infonce(queries, docs, group_size, temperature, in_batch_negatives)
