"""Autocast rules of the model ops (nvembed_ext/_autocast.py), on CPU autocast (the CUDA rule is the same code with
the CUDA dispatch key): inputs are cast to the region's dtype, the result equals the op on cast inputs, gradients
reach fp32 leaves in fp32, and nothing changes outside autocast."""
import pytest
import torch

import nvembed
import nvembed_ext  # noqa: F401

OPS = torch.ops.nvembed


def test_flash_attn_casts_to_the_region_dtype():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 32, generator=gen, requires_grad=True)
    k = torch.randn(2, 11, 2, 32, generator=gen, requires_grad=True)
    v = torch.randn(2, 11, 2, 32, generator=gen, requires_grad=True)
    mask = torch.rand(2, 11, generator=gen) < 0.8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OPS.flash_attn(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, OPS.flash_attn(q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16(), mask))
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert OPS.flash_attn(q, k, v, mask).dtype == torch.float32  # outside the region: unchanged


def test_float64_inputs_are_not_cast():
    """Like torch's autocast (SDPA keeps float64): float64 tensors stay float64 inside the region."""
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OPS.flash_attn(q, q, q)
        assert torch.nn.functional.scaled_dot_product_attention(q, q, q).dtype == torch.float64
    assert out.dtype == torch.float64 and torch.equal(out, OPS.flash_attn(q, q, q))


def test_flash_attn_varlen_casts():
    q = torch.randn(7, 2, 32)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OPS.flash_attn_varlen(q, q, q, cu, cu, 4, 4)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, OPS.flash_attn_varlen(q.bfloat16(), q.bfloat16(), q.bfloat16(), cu, cu, 4, 4))


def test_latent_pool_mixed_dtypes_under_autocast():
    """bf16 hidden states and fp32 parameters: outside autocast the op rejects the mix; inside, everything runs in
    bf16 and the fp32 parameters get fp32 gradients. Fractional pool weights are not rounded to bf16."""
    torch.manual_seed(0)
    layer = nvembed.LatentAttentionPooling(hidden_dim=32, num_latents=8, num_heads=2, dim_head=16)
    hidden = torch.randn(3, 5, 32).bfloat16()
    pool_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0.3, 1, 1, 0, 0]])
    with pytest.raises(TypeError, match="nvembed::latent_pool"):
        layer(hidden, pool_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(hidden, pool_mask)
    assert out.dtype == torch.bfloat16
    weights = [w.detach().bfloat16() for w in layer.op_weights()]
    exp = OPS.latent_pool(hidden, pool_mask, *weights, layer.num_heads, layer.normalize, layer.eps)
    assert torch.equal(out, exp)
    out.float().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("env", [{}, {"NVEMBED_INFONCE_FWD": "gemm", "NVEMBED_INFONCE_BWD": "gemm"},
                                 {"NVEMBED_INFONCE_GRAD": "fused"}], ids=["tiles", "gemm", "fused"])
def test_infonce_inside_autocast_keeps_its_dtypes(env, monkeypatch):
    """InfoNCE has no autocast rule (fp32 embeddings on purpose): inside a region the loss and gradients equal those
    outside. The ATen-based paths once had their fp32 GEMMs recast to bf16 by the region and failed an internal
    check."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    gen = torch.Generator().manual_seed(3)
    q0, d0 = torch.randn(6, 16, generator=gen), torch.randn(18, 16, generator=gen)
    results = []
    for region in (False, True):
        q, d = q0.clone().requires_grad_(), d0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=region):
            loss = OPS.infonce(q, d, 3, 0.1, True)
        loss.backward()
        results.append((loss.detach(), q.grad, d.grad))
    assert results[1][0].dtype == torch.float32
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
