"""Fake kernels and autograd for nvembed::flash_attn / nvembed::flash_attn_varlen.

The public ops are CompositeImplicitAutograd wrappers (C++) over _flash_attn_fwd / _flash_attn_varlen_fwd, which
return (out, lse); autograd is registered on those, so the backward reuses the forward's log-sum-exp instead of
recomputing it. lse is a statistic, not a differentiable output: its gradient is ignored.
"""
import torch

from ._first_order import first_order

_lib = "nvembed::"


def _lse_dtype(q):
    # the log-sum-exp is kept in the accumulation type: fp64 for fp64 inputs (gradcheck), fp32 otherwise
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake(_lib + "_flash_attn_fwd")
def _flash_attn_fwd_fake(q, k, v, key_padding_mask=None, scale=None):
    torch._check(q.dim() == 4, lambda: "nvembed::flash_attn: q must be 4-D [B, Lq, Hq, D]")
    torch._check(k.dim() == 4 and v.dim() == 4, lambda: "nvembed::flash_attn: k and v must be 4-D [B, Lk, Hkv, D]")
    B, Lq, Hq, D = q.shape
    torch._check(k.shape[0] == B and v.shape[0] == B, lambda: "nvembed::flash_attn: batch sizes of q, k, v differ")
    torch._check(k.shape[3] == D, lambda: "nvembed::flash_attn: k.size(3) must equal q.size(3)")
    torch._check(k.shape == v.shape, lambda: "nvembed::flash_attn: k and v must have the same shape")
    torch._check(Hq % k.shape[2] == 0, lambda: "nvembed::flash_attn: q heads must be a multiple of kv heads")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((B, Hq, Lq), dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake(_lib + "_flash_attn_bwd")
def _flash_attn_bwd_fake(dout, q, k, v, out, lse, key_padding_mask=None, scale=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _fa_setup_context(ctx, inputs, output):
    q, k, v, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.scale = scale


def _fa_backward(ctx, dout, dlse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None
    dq, dk, dv = first_order("flash_attn", torch.ops.nvembed._flash_attn_bwd(dout, q, k, v, out, lse, mask, ctx.scale))
    return dq, dk, dv, None, None


torch.library.register_autograd(_lib + "_flash_attn_fwd", _fa_backward, setup_context=_fa_setup_context)


@torch.library.register_fake(_lib + "_flash_attn_varlen_fwd")
def _flash_attn_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None):
    torch._check(q.dim() == 3, lambda: "nvembed::flash_attn_varlen: q must be 3-D [total_q, Hq, D]")
    torch._check(k.dim() == 3 and v.dim() == 3, lambda: "nvembed::flash_attn_varlen: k, v must be 3-D")
    torch._check(k.shape[2] == q.shape[2], lambda: "nvembed::flash_attn_varlen: k.size(2) must equal q.size(2)")
    torch._check(q.shape[1] % k.shape[1] == 0,
                 lambda: "nvembed::flash_attn_varlen: q heads must be a multiple of kv heads")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake(_lib + "_flash_attn_varlen_bwd")
def _flash_attn_varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                scale=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _fav_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale


def _fav_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        return (None,) * 8
    dq, dk, dv = first_order("flash_attn_varlen", torch.ops.nvembed._flash_attn_varlen_bwd(
        dout, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale))
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd(_lib + "_flash_attn_varlen_fwd", _fav_backward, setup_context=_fav_setup_context)
