"""Fake kernels and autograd for nvembed::latent_pool.

The public op is a CompositeImplicitAutograd wrapper (C++) over _latent_pool_fwd, which returns (out, pooled):
pooled [B, d] is the pre-normalization masked mean (float32, or float64 for float64 inputs), the only statistic the
backward needs; _latent_pool_bwd recomputes the per-token activations itself. pooled is not a differentiable
output: its gradient is ignored.

When gradients are needed and they fit NVEMBED_LATENT_POOL_SAVE_MB (MiB; default 1024 for the CPU kernel, 0 for the
CUDA path: verified there, but slower than the fused stages' recomputation), the wrapper calls _latent_pool_fwd_save
instead: it also returns geglu_mean [B, F], resid [B*L, d] and ff_hidden [B*L, 2F] (the GEGLU's pooled output, the
attention block's output + residual, the GEGLU's input before its bias; rows = active tokens in order, then zeros),
and _latent_pool_bwd_saved reads them instead of recomputing the attention output and the feed-forward's first GEMM.
"""
import math

import torch

from ._first_order import first_order

_lib = "nvembed::"
_OP = "nvembed::latent_pool: "

# gradient order of _latent_pool_bwd = the op's tensor arguments without pool_mask
_WEIGHT_NAMES = ("latents", "norm_weight", "norm_bias", "norm_context_weight", "norm_context_bias", "to_q_weight",
                 "to_kv_weight", "to_out_weight", "ff_norm_weight", "ff_norm_bias", "ff_in_weight", "ff_in_bias",
                 "ff_out_weight", "ff_out_bias")


def _check_args(hidden_states, pool_mask, weights, num_heads, eps):
    torch._check(hidden_states.dim() == 3, lambda: _OP + "hidden_states must be 3-D [B, L, d]")
    # the CPU kernel takes float32 / bfloat16 / float64, the CUDA path float32 / bfloat16 / float16
    allowed = (torch.float32, torch.bfloat16, torch.float64) if hidden_states.device.type != "cuda" else (
        torch.float32, torch.bfloat16, torch.float16)
    torch._check(hidden_states.dtype in allowed,
                 lambda: _OP + f"hidden_states has dtype {hidden_states.dtype}; expected one of {allowed}")
    B, L, d = hidden_states.shape
    torch._check(B > 0, lambda: _OP + "hidden_states has an empty batch (B = 0)")
    torch._check(num_heads >= 1, lambda: _OP + f"num_heads must be >= 1, got {num_heads}")
    torch._check(math.isfinite(eps) and eps > 0, lambda: _OP + f"eps must be finite and > 0, got {eps}")
    torch._check(hidden_states.dtype == torch.float64 or eps >= torch.finfo(torch.float32).tiny,
                 lambda: _OP + f"eps={eps} is too small for {hidden_states.dtype} inputs: it must be at least "
                               "float32's smallest normal number")
    w = dict(zip(_WEIGHT_NAMES, weights))
    for name, t in w.items():
        torch._check(t.device == hidden_states.device,
                     lambda name=name: _OP + f"{name} is on another device than hidden_states")
        torch._check(t.dtype == hidden_states.dtype,
                     lambda name=name: _OP + f"{name} has another dtype than hidden_states")
    torch._check(w["latents"].dim() == 2 and w["latents"].shape[1] == d,
                 lambda: _OP + "latents must have shape [N, d]")
    for name in ("norm_weight", "norm_bias", "norm_context_weight", "norm_context_bias", "ff_norm_weight",
                 "ff_norm_bias", "ff_out_bias"):
        torch._check(w[name].dim() == 1 and w[name].shape[0] == d,
                     lambda name=name: _OP + f"{name} must have shape [d]")
    wq = w["to_q_weight"]
    torch._check(wq.dim() == 2 and wq.shape[1] == d, lambda: _OP + "to_q_weight must have shape [I, d]")
    inner = wq.shape[0]
    torch._check(inner % num_heads == 0, lambda: _OP + "to_q_weight.size(0) must be a multiple of num_heads")
    torch._check(w["to_kv_weight"].dim() == 2 and w["to_kv_weight"].shape == (2 * inner, d),
                 lambda: _OP + "to_kv_weight must have shape [2I, d]")
    torch._check(w["to_out_weight"].dim() == 2 and w["to_out_weight"].shape == (d, inner),
                 lambda: _OP + "to_out_weight must have shape [d, I]")
    fin = w["ff_in_weight"]
    torch._check(fin.dim() == 2 and fin.shape[1] == d and fin.shape[0] % 2 == 0,
                 lambda: _OP + "ff_in_weight must have shape [2F, d]")
    torch._check(w["ff_in_bias"].dim() == 1 and w["ff_in_bias"].shape[0] == fin.shape[0],
                 lambda: _OP + "ff_in_bias must have shape [2F]")
    torch._check(w["ff_out_weight"].dim() == 2 and w["ff_out_weight"].shape == (d, fin.shape[0] // 2),
                 lambda: _OP + "ff_out_weight must have shape [d, F]")
    if pool_mask is not None:
        torch._check(pool_mask.device == hidden_states.device,
                     lambda: _OP + "pool_mask is on another device than hidden_states")
        torch._check(pool_mask.dim() == 2 and pool_mask.shape == (B, L),
                     lambda: _OP + "pool_mask must have shape [B, L]")
    return B, d


def _stat_dtype(hidden_states):
    return torch.float64 if hidden_states.dtype == torch.float64 else torch.float32


@torch.library.register_fake(_lib + "_latent_pool_fwd")
def _latent_pool_fwd_fake(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight,
                          norm_context_bias, to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight, ff_norm_bias,
                          ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, num_heads, normalize=True, eps=1e-5):
    weights = (latents, norm_weight, norm_bias, norm_context_weight, norm_context_bias, to_q_weight, to_kv_weight,
               to_out_weight, ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias)
    B, d = _check_args(hidden_states, pool_mask, weights, num_heads, eps)
    out = hidden_states.new_empty((B, d))
    pooled = hidden_states.new_empty((B, d), dtype=_stat_dtype(hidden_states))
    return out, pooled


@torch.library.register_fake(_lib + "_latent_pool_bwd")
def _latent_pool_bwd_fake(grad_out, pooled, hidden_states, pool_mask, latents, norm_weight, norm_bias,
                          norm_context_weight, norm_context_bias, to_q_weight, to_kv_weight, to_out_weight,
                          ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias,
                          num_heads, normalize=True, eps=1e-5):
    weights = (latents, norm_weight, norm_bias, norm_context_weight, norm_context_bias, to_q_weight, to_kv_weight,
               to_out_weight, ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias)
    B, d = _check_args(hidden_states, pool_mask, weights, num_heads, eps)
    torch._check(grad_out.shape == (B, d), lambda: _OP + "grad_out must have shape [B, d]")
    torch._check(pooled.shape == (B, d), lambda: _OP + "pooled must have shape [B, d]")
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (hidden_states, *weights)]


@torch.library.register_fake(_lib + "_latent_pool_fwd_save")
def _latent_pool_fwd_save_fake(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight,
                               norm_context_bias, to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight,
                               ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, num_heads,
                               normalize=True, eps=1e-5):
    out, pooled = _latent_pool_fwd_fake(hidden_states, pool_mask, latents, norm_weight, norm_bias, norm_context_weight,
                                        norm_context_bias, to_q_weight, to_kv_weight, to_out_weight, ff_norm_weight,
                                        ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias, num_heads,
                                        normalize, eps)
    saved = [hidden_states.new_empty(shape, dtype=dtype) for shape, dtype in _saved_layout(hidden_states, ff_in_weight)]
    return (out, pooled, *saved)


def _saved_layout(hidden_states, ff_in_weight):
    """(shape, dtype) of geglu_mean, resid, ff_hidden (latent_pool_saved_empty in csrc/latent_pool_aten.h): ff_hidden
    comes out of a GEMM in the input dtype on CUDA, in the compute dtype on CPU."""
    B, L, d = hidden_states.shape
    F = ff_in_weight.shape[0] // 2
    acc = _stat_dtype(hidden_states)
    return [((B, F), acc), ((B * L, d), acc),
            ((B * L, 2 * F), hidden_states.dtype if hidden_states.device.type == "cuda" else acc)]


@torch.library.register_fake(_lib + "_latent_pool_bwd_saved")
def _latent_pool_bwd_saved_fake(grad_out, pooled, geglu_mean, resid, ff_hidden, hidden_states, pool_mask, latents,
                                norm_weight, norm_bias, norm_context_weight, norm_context_bias, to_q_weight,
                                to_kv_weight, to_out_weight, ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias,
                                ff_out_weight, ff_out_bias, num_heads, normalize=True, eps=1e-5):
    for name, t, (shape, dtype) in zip(("geglu_mean", "resid", "ff_hidden"), (geglu_mean, resid, ff_hidden),
                                       _saved_layout(hidden_states, ff_in_weight)):
        torch._check(t.device == hidden_states.device,
                     lambda name=name: _OP + f"{name} is on another device than hidden_states")
        torch._check(t.shape == shape, lambda name=name, shape=shape: _OP + f"{name} must have shape {list(shape)}")
        torch._check(t.dtype == dtype, lambda name=name, dtype=dtype: _OP + f"{name} must have dtype {dtype}")
    return _latent_pool_bwd_fake(grad_out, pooled, hidden_states, pool_mask, latents, norm_weight, norm_bias,
                                 norm_context_weight, norm_context_bias, to_q_weight, to_kv_weight, to_out_weight,
                                 ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias, ff_out_weight, ff_out_bias,
                                 num_heads, normalize, eps)


def _setup_context(ctx, inputs, output):
    """Both forwards: _latent_pool_fwd returns (out, pooled), _latent_pool_fwd_save also the activations it kept."""
    *tensors, num_heads, normalize, eps = inputs
    _, pooled, *acts = output
    hidden_states, pool_mask, *weights = tensors
    if pool_mask is not None and pool_mask.requires_grad:
        raise RuntimeError(_OP + "pool_mask requires grad, but the op gives no gradient for it (it selects and "
                                 "weights the pooled tokens): pass pool_mask.detach()")
    ctx.has_mask, ctx.num_acts = pool_mask is not None, len(acts)
    ctx.save_for_backward(hidden_states, *weights, pooled, *acts, *([pool_mask] if ctx.has_mask else []))
    ctx.num_heads, ctx.normalize, ctx.eps = num_heads, normalize, eps
    # Only `out` is differentiable. Without this autograd would hand the backward zero-filled gradients for pooled
    # and the saved activations (for ff_hidden a [B*L, 2F] tensor of zeros: as large as ff_hidden itself).
    ctx.mark_non_differentiable(pooled, *acts)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *_):
    saved = ctx.saved_tensors
    hidden_states, weights, pooled = saved[0], saved[1:15], saved[15]
    acts = saved[16:16 + ctx.num_acts]
    pool_mask = saved[16 + ctx.num_acts] if ctx.has_mask else None
    if grad_out is None:
        return (None,) * 16 + (None, None, None)
    args = (hidden_states, pool_mask, *weights, ctx.num_heads, ctx.normalize, ctx.eps)
    if acts:
        grads = torch.ops.nvembed._latent_pool_bwd_saved(grad_out.contiguous(), pooled, *acts, *args)
    else:
        grads = torch.ops.nvembed._latent_pool_bwd(grad_out.contiguous(), pooled, *args)
    # only the gradients autograd asked for (the op computes all of them), each first-order only
    grads = first_order("latent_pool", [g if need else None for g, need in
                                        zip(grads, (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:16]))])
    return (grads[0], None, *grads[1:], None, None, None)


for _op in ("_latent_pool_fwd", "_latent_pool_fwd_save"):
    torch.library.register_autograd(_lib + _op, _backward, setup_context=_setup_context)
