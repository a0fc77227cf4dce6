"""CPU: nvembed::flash_attn vs torch.nn.functional.scaled_dot_product_attention (non-causal), B=4, L=512, H=8,
D=64, fp32 and bf16, forward and forward+backward, same inputs, same run."""
import pytest
import torch
import torch.nn.functional as F

import nvembed_ext  # noqa: F401

B, L, H, D = 4, 512, 8, 64


def _setup(dtype, grad):
    q, k, v = (torch.randn(B, L, H, D, dtype=dtype, requires_grad=grad) for _ in range(3))
    dout = torch.randn(B, L, H, D, dtype=dtype)
    return q, k, v, dout


def _variants(q, k, v):
    # SDPA wants [B, H, L, D]: the transposed views are what a model holding [B, L, H, D] would pass it.
    return {
        "nvembed": lambda: torch.ops.nvembed.flash_attn(q, k, v),
        "sdpa": lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                       v.transpose(1, 2)).transpose(1, 2),
    }


@pytest.mark.parametrize("variant", ["sdpa", "nvembed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention(benchmark, variant, dtype, mode):
    q, k, v, dout = _setup(dtype, grad=(mode != "fwd"))
    fn = _variants(q, k, v)[variant]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn()
    else:
        def run():
            torch.autograd.grad(fn(), (q, k, v), dout)
    benchmark.group = f"attention {mode} {str(dtype)[6:]} B{B} L{L} H{H} D{D}"
    benchmark.extra_info.update(variant=variant, anchor="sdpa")
    benchmark.pedantic(run, warmup_rounds=3, rounds=15, iterations=1)
