"""Fake kernels and autograd for nvembed::infonce (owned by the InfoNCE work; see csrc/cpu/infonce.*).

The fake kernel repeats the C++ launcher's argument checks (same messages), so that torch.compile / meta tensors
reject bad inputs the way eager does. loss and lse are float32, or float64 for float64 inputs (which are computed
in double so that gradcheck can use them).
"""
import math

import torch

from ._first_order import first_order

_lib = "nvembed::"
_OP = "nvembed::infonce: "


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_inputs(queries, docs, group_size, temperature, in_batch_negatives):
    torch._check_value(queries.dim() == 2, lambda: f"{_OP}queries must be 2-D [B, d], got shape {tuple(queries.shape)}")
    torch._check_value(docs.dim() == 2, lambda: f"{_OP}docs must be 2-D [B*G + E, d], got shape {tuple(docs.shape)}")
    torch._check_value(queries.device == docs.device,
                       lambda: f"{_OP}docs is on {docs.device} but queries is on {queries.device}")
    allowed = (torch.float32, torch.bfloat16, torch.float64) if queries.device.type != "cuda" else (
        torch.float32, torch.bfloat16, torch.float16)
    torch._check_type(queries.dtype in allowed,
                      lambda: f"{_OP}queries has dtype {queries.dtype}; expected one of {allowed}")
    torch._check_type(docs.dtype == queries.dtype,
                      lambda: f"{_OP}docs has dtype {docs.dtype} but queries has dtype {queries.dtype}")
    torch._check_value(group_size >= 1, lambda: f"{_OP}group_size must be >= 1, got {group_size}")
    torch._check_value(math.isfinite(temperature) and temperature > 0,
                       lambda: f"{_OP}temperature must be finite and > 0, got {temperature}")
    torch._check_value(queries.dtype == torch.float64 or 1.0 / temperature <= _FLOAT32_MAX,
                       lambda: f"{_OP}temperature={temperature} is too small for {queries.dtype} inputs: 1/temperature "
                               "must be within float32's range")
    B, N = queries.shape[0], docs.shape[0]
    torch._check_value(B > 0, lambda: f"{_OP}queries.size(0) must be > 0 (empty batch)")
    torch._check_value(docs.shape[1] == queries.shape[1],
                       lambda: f"{_OP}docs.size(1)={docs.shape[1]} is not queries.size(1)={queries.shape[1]}")
    BG = B * group_size
    torch._check_value(BG < 2 ** 63, lambda: f"{_OP}queries.size(0)*group_size overflows int64 "
                                             f"(queries.size(0)={B}, group_size={group_size})")
    # docs = [B*G grouped rows | E >= 0 extra negatives]; only the in-batch softmax can use extra rows (the
    # own-group one would ignore them silently), see csrc/cpu/infonce.cpp.
    if in_batch_negatives:
        torch._check_value(N >= BG, lambda: f"{_OP}docs.size(0)={N} is less than queries.size(0)*group_size={BG} "
                                            "(docs holds the B*G grouped docs, then any extra negatives)")
    else:
        torch._check_value(N == BG, lambda: f"{_OP}docs.size(0)={N} is not queries.size(0)*group_size={BG}" + (
            " (extra negative docs need in_batch_negatives=True)" if N > BG else ""))


@torch.library.register_fake(_lib + "_infonce_fwd")
def _infonce_fwd_fake(queries, docs, group_size, temperature, in_batch_negatives=True):
    _check_inputs(queries, docs, group_size, temperature, in_batch_negatives)
    acc = _acc_dtype(queries)
    loss = queries.new_empty((), dtype=acc)
    lse = queries.new_empty((queries.shape[0],), dtype=acc)
    return loss, lse


@torch.library.register_fake(_lib + "_infonce_bwd")
def _infonce_bwd_fake(grad_loss, queries, docs, lse, group_size, temperature, in_batch_negatives=True):
    _check_inputs(queries, docs, group_size, temperature, in_batch_negatives)
    return torch.empty_like(queries, memory_format=torch.contiguous_format), torch.empty_like(
        docs, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    queries, docs, group_size, temperature, in_batch_negatives = inputs
    ctx.save_for_backward(queries, docs, output[1])
    ctx.args = (group_size, temperature, in_batch_negatives)


def _backward(ctx, grad_loss, grad_lse):
    # lse is a by-product for the backward; it is not differentiable (grad_lse is ignored).
    queries, docs, lse = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    dq, dd = first_order("infonce", torch.ops.nvembed._infonce_bwd(grad_loss, queries, docs, lse, *ctx.args))
    return dq, dd, None, None, None


torch.library.register_autograd(_lib + "_infonce_fwd", _backward, setup_context=_setup_context)



@torch.library.register_fake(_lib + "_infonce_fwd_grad")
def _infonce_fwd_grad_fake(queries, docs, group_size, temperature, in_batch_negatives=True):
    _check_inputs(queries, docs, group_size, temperature, in_batch_negatives)
    loss = queries.new_empty((), dtype=_acc_dtype(queries))
    return loss, torch.empty_like(queries, memory_format=torch.contiguous_format), torch.empty_like(
        docs, memory_format=torch.contiguous_format)


# _infonce_fwd_grad (NVEMBED_INFONCE_GRAD=fused, csrc/infonce_gemm.h) returns the gradients for an upstream gradient
# of 1; the loss is a mean, so the backward scales them. Differentiating the gradients again raises (as with the
# other path).
def _fwd_grad_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph / create_graph); True where torch cannot say."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return True if keep is None else bool(keep())
    except RuntimeError:  # not inside a backward pass
        return True


def _fwd_grad_backward(ctx, grad_loss, grad_gq, grad_gd):
    gq, gd = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    g = grad_loss.to(_acc_dtype(gq))  # 0-dim: the products are formed in fp32 and rounded once to the input dtype
    need_q, need_d = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not torch.compiler.is_compiling() and not _graph_kept():
        # The graph is freed after this pass, so nothing reads the saved gradients again: scale them in place and
        # hand them over (no second [B + N, d] pair beside them, the peak memory of this path; no host sync, any
        # g). The private op's own gradient outputs are these tensors: after this backward they hold g times their
        # value and may become the leaves' .grad (the public op returns only the loss).
        dq = gq.detach().mul_(g) if need_q else None
        dd = gd.detach().mul_(g) if need_d else None
    else:  # a retained graph (its saved gradients must stay intact for the next pass) or a traced one
        dq = gq * g if need_q else None
        dd = gd * g if need_d else None
    dq, dd = first_order("infonce", (dq, dd))
    return dq, dd, None, None, None


torch.library.register_autograd(_lib + "_infonce_fwd_grad", _fwd_grad_backward, setup_context=_fwd_grad_setup_context)

