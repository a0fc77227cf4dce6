"""Fake kernels and autograd for nvembed::flash_attn / nvembed::flash_attn_varlen.

The public ops are CompositeImplicitAutograd wrappers (C++) over _flash_attn_fwd / _flash_attn_varlen_fwd, which
return (out, lse); autograd is registered on those, so the backward reuses the forward's log-sum-exp instead of
recomputing it. lse is a statistic, not a differentiable output: its gradient is ignored.
"""
import math

import torch

from ._first_order import first_order

_lib = "nvembed::"


def _lse_dtype(q):
    # the log-sum-exp is kept in the accumulation type: fp64 for fp64 inputs (gradcheck), fp32 otherwise
    return torch.float64 if q.dtype == torch.float64 else torch.float32


_DTYPES = {"cuda": (torch.bfloat16, torch.float16), "cpu": (torch.float32, torch.bfloat16, torch.float64)}
_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
              torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Char",
              torch.int16: "Short"}


def _name(dtype):
    return _C10_NAMES.get(dtype, str(dtype))  # the eager messages' (c10) names


def _check_qkv(op, q, k, v, rank):
    """The eager kernels' checks of q / k / v (check_qkv in csrc/flash_attn_common.cpp), with their messages and error
    types: a compiled graph rejects what eager rejects, when it is traced."""
    p = f"nvembed::{op}: "
    layout = "[B, L, H, D]" if rank == 4 else "[total, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check_value(t.dim() == rank,
                           lambda name=name, t=t: f"{p}{name} must be {rank}-D {layout}, got shape {list(t.shape)}")
    allowed = _DTYPES.get(q.device.type)
    if allowed is not None:
        torch._check_type(q.dtype in allowed, lambda: f"{p}q has dtype {_name(q.dtype)}; expected one of "
                                                       f"{', '.join(map(_name, allowed))}")
    for name, t in (("k", k), ("v", v)):
        torch._check_type(t.dtype == q.dtype, lambda name=name, t=t: (f"{p}{name} has dtype {_name(t.dtype)} but q "
                                                                      f"has dtype {_name(q.dtype)}"))
        torch._check_value(t.device == q.device, lambda name=name, t=t: f"{p}{name} is on {t.device} but q is on "
                                                                        f"{q.device}")
    torch._check_value(k.shape == v.shape, lambda: f"{p}k has shape {list(k.shape)} but v has shape {list(v.shape)}")
    d = rank - 1
    torch._check_value(q.shape[d] > 0, lambda: f"{p}q.size({d}) (head dim) must be > 0")
    torch._check_value(k.shape[d] == q.shape[d],
                       lambda: f"{p}k.size({d})={k.shape[d]} (head dim) is not q.size({d})={q.shape[d]}")
    hq, hkv = q.shape[d - 1], k.shape[d - 1]
    torch._check_value(hq > 0 and hkv > 0,
                       lambda: f"{p}q and k need at least one head, got q heads {hq}, k heads {hkv}")
    torch._check_value(hq % hkv == 0, lambda: f"{p}q heads ({hq}) must be a multiple of k/v heads ({hkv})")


def _check_scale(op, scale):
    if scale is not None:
        torch._check_value(math.isfinite(scale) and abs(scale) <= torch.finfo(torch.float32).max,
                           lambda: f"nvembed::{op}: scale must be finite and within float32's range, got {scale}")


@torch.library.register_fake(_lib + "_flash_attn_fwd")
def _flash_attn_fwd_fake(q, k, v, key_padding_mask=None, scale=None):
    _check_qkv("flash_attn", q, k, v, 4)
    B, Lq, Hq, D = q.shape
    torch._check_value(B > 0, lambda: "nvembed::flash_attn: q has an empty batch (q.size(0) == 0)")
    torch._check_value(k.shape[0] == B, lambda: f"nvembed::flash_attn: k.size(0)={k.shape[0]} (batch) is not "
                                                f"q.size(0)={B}")
    if key_padding_mask is not None:
        m = key_padding_mask
        torch._check_type(m.dtype == torch.bool, lambda: "nvembed::flash_attn: key_padding_mask must be bool (True = "
                                                         f"attend), got {_name(m.dtype)}")
        torch._check_value(m.device == q.device, lambda: f"nvembed::flash_attn: key_padding_mask is on {m.device} but "
                                                         f"q is on {q.device}")
        torch._check_value(m.dim() == 2 and m.shape[0] == B and m.shape[1] == k.shape[1],
                           lambda: f"nvembed::flash_attn: key_padding_mask must have shape [B, Lk] = [{B}, "
                                   f"{k.shape[1]}], got {list(m.shape)}")
    _check_scale("flash_attn", scale)
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
    _check_qkv("flash_attn_varlen", q, k, v, 3)
    _check_scale("flash_attn_varlen", scale)
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
