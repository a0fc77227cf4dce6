"""Fake kernels and autograd for nvembed::infonce (owned by the InfoNCE work; see csrc/cpu/infonce.*)."""
import torch

_lib = "nvembed::"


@torch.library.register_fake(_lib + "_infonce_fwd")
def _infonce_fwd_fake(queries, docs, group_size, temperature, in_batch_negatives=True):
    torch._check(queries.dim() == 2, lambda: "nvembed::infonce: queries must be 2-D [B, d]")
    torch._check(docs.dim() == 2, lambda: "nvembed::infonce: docs must be 2-D [B*G, d]")
    torch._check(docs.shape[0] == queries.shape[0] * group_size,
                 lambda: "nvembed::infonce: docs.size(0) is not queries.size(0)*group_size")
    loss = queries.new_empty((), dtype=torch.float32)
    lse = queries.new_empty((queries.shape[0],), dtype=torch.float32)
    return loss, lse


@torch.library.register_fake(_lib + "_infonce_bwd")
def _infonce_bwd_fake(grad_loss, queries, docs, lse, group_size, temperature, in_batch_negatives=True):
    return torch.empty_like(queries), torch.empty_like(docs)


def _setup_context(ctx, inputs, output):
    queries, docs, group_size, temperature, in_batch_negatives = inputs
    ctx.save_for_backward(queries, docs, output[1])
    ctx.args = (group_size, temperature, in_batch_negatives)


def _backward(ctx, grad_loss, grad_lse):
    queries, docs, lse = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    dq, dd = torch.ops.nvembed._infonce_bwd(grad_loss, queries, docs, lse, *ctx.args)
    return dq, dd, None, None, None


torch.library.register_autograd(_lib + "_infonce_fwd", _backward, setup_context=_setup_context)
