"""First-order-only gradients: the ops' backward formulas are not differentiable (their backward ops have no
autograd formula of their own), so a gradient they return under create_graph=True is wrapped in an identity whose
backward raises. Differentiating it again (a gradient penalty, double backward) then fails with an error naming the
op instead of torch's not-implemented warning and silently zero (or missing) second derivatives."""
import torch


class _FirstOrderOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op):
        ctx.op = op
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(f"nvembed::{ctx.op}: second derivatives are not implemented (the gradient of the "
                                  "op's output was differentiated again, e.g. after create_graph=True)")


def first_order(op: str, grads):
    """`grads` (a sequence; None entries stay None) guarded as the module docstring says; unchanged outside a
    create_graph backward (grad mode is off there: nothing to guard)."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    return tuple(g if g is None else _FirstOrderOnly.apply(g, op) for g in grads)
