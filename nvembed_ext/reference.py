"""Pure-PyTorch references: the specification every nvembed kernel is tested and benchmarked against.

Each function computes in the dtype it is given (the tests pass float64), materializes everything, and is written
for clarity, not speed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def flash_attn_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   return_lse: bool = False):
    """Non-causal attention. q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; query head h reads kv head h // (Hq // Hkv).

    key_padding_mask [B, Lk] bool (True = attend). Rows whose keys are all masked return 0 (lse = +inf).
    """
    B, Lq, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk = k.repeat_interleave(g, dim=2)
    vv = v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :].bool(), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    dead = torch.isinf(m) & (m < 0)
    m = torch.where(dead, torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(dead, torch.ones_like(l), l)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    if not return_lse:
        return out
    lse = (m + torch.log(l)).squeeze(-1)
    lse = torch.where(dead.squeeze(-1), torch.full_like(lse, float("inf")), lse)
    return out, lse


def flash_attn_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                          scale: Optional[float] = None):
    """Packed sequences: q [Tq, Hq, D], k/v [Tk, Hkv, D]; sequence i is rows cu[i]:cu[i+1]."""
    out = torch.zeros_like(q)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs:
            continue
        if ke == ks:  # no keys at all: the fully-masked rule gives zeros
            continue
        out[qs:qe] = flash_attn_ref(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], None, scale)[0]
    return out


def infonce_ref(queries: torch.Tensor, docs: torch.Tensor, group_size: int, temperature: float,
                in_batch_negatives: bool = True) -> torch.Tensor:
    """Mean InfoNCE loss. docs [B*G + E, d]: docs[i*G] is query i's positive, docs[i*G+1:(i+1)*G] its hard
    negatives, and the E >= 0 rows after the first B*G are negatives for every query (in-batch negatives only).

    With in-batch negatives every query is scored against all B*G + E docs (target i*G); without, against its own
    G docs (target 0), and docs must hold exactly B*G rows. Materializes the full logits: the naive baseline.
    """
    B = queries.shape[0]
    G = group_size
    if in_batch_negatives:
        if docs.shape[0] < B * G:
            raise ValueError(f"infonce_ref: docs.size(0)={docs.shape[0]} is less than "
                             f"queries.size(0)*group_size={B * G}")
        logits = queries @ docs.T / temperature
        target = torch.arange(B, device=queries.device) * G
    else:
        if docs.shape[0] != B * G:
            raise ValueError(f"infonce_ref: docs.size(0)={docs.shape[0]} is not queries.size(0)*group_size={B * G} "
                             "(extra negative docs need in_batch_negatives=True)")
        logits = torch.einsum("bd,bgd->bg", queries, docs.view(B, G, -1)) / temperature
        target = torch.zeros(B, dtype=torch.long, device=queries.device)
    return F.cross_entropy(logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits, target)


def _layer_norm(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def latent_pool_ref(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight,
                    norm_context_bias, to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight, ff_norm_bias,
                    ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, num_heads: int, normalize: bool = True,
                    eps: float = 1e-5):
    """NV-Embed-v2's LatentAttentionModel.forward, unfused, plus the masked mean and optional L2 normalization.

    hidden_states [B, L, d] are the queries (after LayerNorm `norm`), the latent array [N, d] (after LayerNorm
    `norm_context`) gives keys and values through to_kv; softmax over the N latents with scale 1/sqrt(dim_head),
    no mask; to_out; residual. Then LayerNorm `ff_norm` -> Linear(d, 2*F) -> GEGLU (first half value, second half
    gate, exact GELU) -> Linear(F, d); residual. Then the mean over tokens with pool_mask == 1 (None = all tokens);
    a row whose pool_mask is all zero returns 0 (the released code would return NaN).
    """
    B, L, d = hidden_states.shape
    inner = to_q_weight.shape[0]
    H = num_heads
    dh = inner // H
    x = hidden_states
    xn = _layer_norm(x, norm_weight, norm_bias, eps)
    ctx = _layer_norm(latents, norm_context_weight, norm_context_bias, eps)
    q = xn @ to_q_weight.T                                     # [B, L, H*dh]
    kv = ctx @ to_kv_weight.T                                  # [N, 2*H*dh]
    k_, v_ = kv.chunk(2, dim=-1)
    qh = q.view(B, L, H, dh).transpose(1, 2)                   # [B, H, L, dh]
    kh = k_.view(-1, H, dh).transpose(0, 1)                    # [H, N, dh]
    vh = v_.view(-1, H, dh).transpose(0, 1)
    s = torch.einsum("bhld,hnd->bhln", qh, kh) / math.sqrt(dh)
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhln,hnd->bhld", p, vh).transpose(1, 2).reshape(B, L, inner)
    y1 = o @ to_out_weight.T + x
    z = _layer_norm(y1, ff_norm_weight, ff_norm_bias, eps)
    u = z @ ff_in_weight.T + ff_in_bias
    a, gates = u.chunk(2, dim=-1)
    y2 = (a * F.gelu(gates)) @ ff_out_weight.T + ff_out_bias + y1
    if pool_mask is None:
        m = torch.ones(B, L, dtype=y2.dtype, device=y2.device)
    else:
        m = pool_mask.to(y2.dtype)
    cnt = m.sum(dim=1, keepdim=True)
    pooled = (y2 * m[..., None]).sum(dim=1) / cnt.clamp_min(1)
    if normalize:
        pooled = F.normalize(pooled, p=2, dim=-1)
    return pooled
