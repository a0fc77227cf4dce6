"""nvembed::infonce on CUDA: both kernel paths (tensor cores for bf16 / fp16 with in-batch negatives; the plain
fp32-FMA tiles, forced with NVEMBED_INFONCE_CUDA_PLAIN=1) against the float64 reference, on awkward shapes (B = 1,
d % 8 != 0, tails of every tile size, extra negative rows), plus full-write, determinism and argument checks.

Every test needs a CUDA device (marked `cuda`; skipped elsewhere). The tensor-core kernels are also run on the CPU
by tools/infonce_emu (test_cuda_emu.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

import nvembed_ext  # registers torch.ops.nvembed.*
from nvembed_ext.reference import infonce_ref

ops = torch.ops.nvembed

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# ||out - ref|| / ||ref|| against float64, per input dtype (as tests/test_infonce.py), or twice PyTorch's own error
# in the input dtype, whichever is larger.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# tensorcore-sm90: the tensor-core path with the Hopper forward (NVEMBED_INFONCE_KERNEL=sm90; TMA + wgmma), run
# only where the dispatcher picks it (a compute capability 9.0 device, a build with sm_90a code).
# gemm: the blocked-GEMM backward (NVEMBED_INFONCE_BWD=gemm: cuBLAS + the chunk kernel of infonce.cu) after the
# automatic forward; the other paths pin the tile backward. gemm-fwd: the GEMM forward (NVEMBED_INFONCE_FWD=gemm:
# cuBLAS + the online log-sum-exp kernel of infonce.cu) with the blocked-GEMM backward.
# fused: the gradients formed in the forward (NVEMBED_INFONCE_GRAD=fused: row blocks of cuBLAS GEMMs around both
# chunk kernels; the backward scales them).
PATHS = ["tensorcore", "tensorcore-sm90", "plain", "gemm", "gemm-fwd", "fused"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    # The launcher reads the variables on every call; "0" and unset both mean the automatic choice.
    monkeypatch.setenv("NVEMBED_INFONCE_CUDA_PLAIN", "1" if request.param == "plain" else "0")
    monkeypatch.setenv("NVEMBED_INFONCE_KERNEL", {"tensorcore-sm90": "sm90", "gemm": "auto"}.get(request.param, "sm80"))
    monkeypatch.setenv("NVEMBED_INFONCE_BWD", "gemm" if request.param.startswith("gemm") else "tiles")
    monkeypatch.setenv("NVEMBED_INFONCE_FWD", "gemm" if request.param == "gemm-fwd" else "tiles")
    monkeypatch.setenv("NVEMBED_INFONCE_GRAD", "fused" if request.param == "fused" else "backward")
    if request.param == "tensorcore-sm90":
        major, minor = torch.cuda.get_device_capability()
        if nvembed_ext._C.infonce_fwd_kernel_for(major, minor) != "sm90":
            pytest.skip(f"the Hopper InfoNCE forward does not run here (compute capability {major}.{minor}, build "
                        f"archs {nvembed_ext.build_info()['cuda_archs']!r})")
    return request.param


def make_inputs(B, G, d, dtype, extra=0, scale=1.0, requires_grad=True):
    """Unit-norm rows (times `scale`), as NV-Embed trains with: logits / t are O(1 / t)."""
    q = F.normalize(torch.randn(B, d, dtype=torch.float64, device="cuda"), dim=-1) * scale
    docs = F.normalize(torch.randn(B * G + extra, d, dtype=torch.float64, device="cuda"), dim=-1) * scale
    return q.to(dtype).requires_grad_(requires_grad), docs.to(dtype).requires_grad_(requires_grad)


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    if denom == 0:  # one logit per row (B = 1, G = 1 without in-batch negatives): loss and gradients are 0
        return (out - ref).norm().item()
    return ((out - ref).norm() / denom).item()


def run_ref(q, docs, G, t, inb, dtype=torch.float64):
    qr = q.detach().to(dtype).requires_grad_()
    dr = docs.detach().to(dtype).requires_grad_()
    loss = infonce_ref(qr, dr, G, t, inb)
    loss.backward()
    return loss, qr.grad, dr.grad


def check_against_ref(q, docs, G, t, inb):
    dtype = q.dtype
    loss = ops.infonce(q, docs, G, t, inb)
    loss.backward()
    gq, gd = q.grad, docs.grad
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert gq.dtype == dtype and gd.dtype == dtype and gq.shape == q.shape and gd.shape == docs.shape
    ref = run_ref(q, docs, G, t, inb)
    same = run_ref(q, docs, G, t, inb, dtype=dtype)  # PyTorch in the input dtype (softmax in fp32)
    loss_floor = 4 * torch.finfo(dtype).eps / max(abs(ref[0].item()), 1e-30)  # loss = log of a sum >= 1
    for name, out, r, s, floor in (("loss", loss, ref[0], same[0], loss_floor), ("grad_queries", gq, ref[1], same[1], 0),
                                   ("grad_docs", gd, ref[2], same[2], 0)):
        assert torch.isfinite(out).all(), name
        tol = max(TOL[dtype], 2 * rel_err(s, r), floor)
        err = rel_err(out, r)
        assert err <= tol, (name, err, tol)


# (B, G, d, extra): B = 1; tails of the 128-row blocks and 128-doc tiles; d % 8 != 0 (padded copy), d < 64 (one
# partial k-chunk), d % 128 != 0 (partial gradient column chunk); G = 1; extra negative rows; d = 4096.
SHAPES = [
    (1, 1, 32, 0), (1, 8, 65, 0), (37, 3, 65, 0), (37, 3, 256, 5), (37, 1, 1024, 0), (130, 8, 136, 3),
    (300, 3, 4096, 2), (3000, 1, 32, 0), (3000, 8, 256, 11),
]


@pytest.mark.parametrize("inb", [True, False], ids=["inbatch", "owngroup"])
@pytest.mark.parametrize("B,G,d,extra", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_reference(path, dtype, B, G, d, extra, inb):
    if not inb and extra:
        pytest.skip("extra negative rows exist only with in-batch negatives")
    q, docs = make_inputs(B, G, d, dtype, extra)
    check_against_ref(q, docs, G, 0.05, inb)


@pytest.mark.parametrize("t", [0.02, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_temperatures(path, dtype, t):
    q, docs = make_inputs(200, 4, 96, dtype, extra=3)
    check_against_ref(q, docs, 4, t, True)


def test_many_blocks_d4096(path):
    """3000 queries x 24000 docs at d = 4096: split forward, and (tensor cores) the dDocs pass in two launches of
    its bounded scratch."""
    q, docs = make_inputs(3000, 8, 4096, torch.bfloat16)
    check_against_ref(q, docs, 8, 0.05, True)


def test_extreme_logits(path):
    """Rows of norm 3 at t = 0.02: logits up to ~450, most softmax terms underflow."""
    q, docs = make_inputs(100, 8, 64, torch.bfloat16, scale=3.0)
    loss = ops.infonce(q, docs, 8, 0.02, True)
    loss.backward()
    ref = run_ref(q, docs, 8, 0.02, True)
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(docs.grad).all()
    assert rel_err(loss, ref[0]) <= 1e-3
    assert rel_err(q.grad, ref[1]) <= 3e-2 and rel_err(docs.grad, ref[2]) <= 3e-2


def test_lse_output(path):
    q, docs = make_inputs(37, 4, 48, torch.bfloat16, extra=5, requires_grad=False)
    _, lse = ops._infonce_fwd(q, docs, 4, 0.05, True)
    ref = torch.logsumexp(q.double() @ docs.double().T / 0.05, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (37,)
    assert rel_err(lse, ref) <= 1e-5


def test_misaligned_and_strided_inputs(path):
    """A contiguous view that starts 2 bytes into its storage (not 16-byte aligned) and a column-strided view."""
    B, G, d = 33, 2, 64
    flat = torch.randn(B * d + 1, device="cuda", dtype=torch.bfloat16) / 8
    q = flat[1:].view(B, d).requires_grad_()  # a leaf: views of a tensor without grad are leaves
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    wide = torch.randn(B * G, 2 * d, device="cuda", dtype=torch.bfloat16) / 8
    docs = wide[:, ::2].requires_grad_()
    assert not docs.is_contiguous()
    check_against_ref(q, docs, G, 0.1, True)


@pytest.mark.parametrize("inb", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_outputs_fully_written(path, dtype, inb):
    """Poison the caching allocator's free blocks with NaN: an output (or workspace) element the kernels skip, or read
    before writing, stays or becomes NaN."""
    B, G, d = 131, 5, 72
    for _ in range(2):
        poison = torch.full((1 << 24,), float("nan"), device="cuda")
        del poison
        q, docs = make_inputs(B, G, d, dtype, extra=3 if inb else 0, requires_grad=False)
        loss, lse = ops._infonce_fwd(q, docs, G, 0.05, inb)
        poison = torch.full((1 << 24,), float("nan"), device="cuda")
        del poison
        gq, gd = ops._infonce_bwd(torch.tensor(1.0, device="cuda"), q, docs, lse, G, 0.05, inb)
        torch.cuda.synchronize()
        for x in (loss, lse, gq, gd):
            assert torch.isfinite(x.float()).all()


def test_deterministic(path):
    """No atomics: two runs give the same bits."""
    q, docs = make_inputs(500, 8, 256, torch.bfloat16, extra=7, requires_grad=False)
    outs = []
    for _ in range(2):
        loss, lse = ops._infonce_fwd(q, docs, 8, 0.05, True)
        outs.append((loss, lse, *ops._infonce_bwd(torch.tensor(1.0, device="cuda"), q, docs, lse, 8, 0.05, True)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_grad_loss_scaling(path):
    q, docs = make_inputs(70, 3, 40, torch.float16, requires_grad=False)
    _, lse = ops._infonce_fwd(q, docs, 3, 0.1, True)
    g1 = ops._infonce_bwd(torch.tensor(1.0, device="cuda"), q, docs, lse, 3, 0.1, True)
    g2 = ops._infonce_bwd(torch.tensor(-2.5, device="cuda"), q, docs, lse, 3, 0.1, True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b.float(), -2.5 * a.float(), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("block,chunk", [(1, 1), (7, 7), (37, 7), (64, 8), (128, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gemm_bwd_chunks(monkeypatch, dtype, block, chunk):
    """The blocked-GEMM backward with block / chunk widths that split groups, leave ragged last blocks and chunks,
    odd widths (the chunk kernel's scalar path) and chunks written into a wider block's buffer, against the float64
    reference."""
    monkeypatch.setenv("NVEMBED_INFONCE_BWD", "gemm")
    monkeypatch.setenv("NVEMBED_INFONCE_BLOCK_COLS", str(block))
    monkeypatch.setenv("NVEMBED_INFONCE_CHUNK_COLS", str(chunk))
    q, docs = make_inputs(67, 3, 72, dtype, extra=5)
    check_against_ref(q, docs, 3, 0.05, True)


@pytest.mark.parametrize("chunk", [1, 7, 8, 37, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gemm_fwd_chunks(monkeypatch, dtype, chunk):
    """The GEMM forward with chunk widths that split groups, leave ragged last chunks and odd widths (the online
    log-sum-exp kernel's scalar path), then the tile backward from its lse, against the float64 reference."""
    monkeypatch.setenv("NVEMBED_INFONCE_FWD", "gemm")
    monkeypatch.setenv("NVEMBED_INFONCE_BWD", "tiles")
    monkeypatch.setenv("NVEMBED_INFONCE_CHUNK_COLS", str(chunk))
    q, docs = make_inputs(67, 3, 72, dtype, extra=5)
    check_against_ref(q, docs, 3, 0.05, True)


@pytest.mark.parametrize("acc", ["auto", "output"])
@pytest.mark.parametrize("rows", [1, 37, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_row_blocks(monkeypatch, dtype, rows, acc):
    """Gradients formed in the forward with row blocks of one query, 37 (ragged, targets mid-docs) and the default
    (one block), N = 206 docs (not a multiple of 4: the chunk kernels' scalar paths), the dD updates into the fp32
    accumulator (auto: it fits) or added into the output by cuBLAS (beta = 1), the probabilities written over the
    scores (in place): the public op takes the path and matches the float64 reference; the backward scales by the
    upstream gradient."""
    monkeypatch.setenv("NVEMBED_INFONCE_GRAD", "fused")
    monkeypatch.setenv("NVEMBED_INFONCE_FUSED_ACC", acc)
    if rows is not None:
        monkeypatch.setenv("NVEMBED_INFONCE_ROW_BLOCK", str(rows))
    q, docs = make_inputs(67, 3, 73, dtype, extra=5)
    assert "_infonce_fwd_grad" in type(ops.infonce(q, docs, 3, 0.05, True).grad_fn).__name__
    check_against_ref(q, docs, 3, 0.05, True)
    q.grad = docs.grad = None
    loss = ops.infonce(q, docs, 3, 0.05, True)
    (loss * 0.25).backward()
    gq = q.grad.clone()
    q.grad = docs.grad = None
    ops.infonce(q, docs, 3, 0.05, True).backward()
    torch.testing.assert_close(gq, q.grad * 0.25, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [None, 30])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_in_place_passes(monkeypatch, dtype, rows):
    """N = 67 * 64 = 4288 docs (a multiple of 4: the float4 paths) per row: the chunk-grad kernel's in-place loop
    runs two passes of its barrier (4096 columns each for float4), the second ragged, writing the probabilities over
    the scores; one block and ragged blocks of 30 queries added into the output."""
    monkeypatch.setenv("NVEMBED_INFONCE_GRAD", "fused")
    monkeypatch.setenv("NVEMBED_INFONCE_FUSED_ACC", "output")
    if rows is not None:
        monkeypatch.setenv("NVEMBED_INFONCE_ROW_BLOCK", str(rows))
    q, docs = make_inputs(67, 64, 64, dtype)
    check_against_ref(q, docs, 64, 0.05, True)


@pytest.mark.parametrize("inb", [True, False])
def test_opcheck_bf16(inb):
    q, docs = make_inputs(70, 3, 40, torch.bfloat16)
    torch.library.opcheck(ops._infonce_fwd, (q, docs, 3, 0.1, inb))
    _, lse = ops._infonce_fwd(q.detach(), docs.detach(), 3, 0.1, inb)
    torch.library.opcheck(ops._infonce_bwd, (torch.tensor(1.0, device="cuda"), q.detach(), docs.detach(), lse, 3,
                                             0.1, inb), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops._infonce_fwd_grad, (q, docs, 3, 0.1, inb),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


ERR = (RuntimeError, ValueError, TypeError)


def test_docs_count_rules():
    q = torch.randn(4, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ERR, match=r"nvembed::infonce: docs\.size\(0\)=10 is not queries\.size\(0\)\*group_size=8 "
                                  r"\(extra negative docs need in_batch_negatives=True\)"):
        ops._infonce_fwd(q, torch.randn(10, 16, device="cuda", dtype=torch.bfloat16), 2, 0.1, False)
    with pytest.raises(ERR, match=r"nvembed::infonce: docs\.size\(0\)=7 is less than queries\.size\(0\)\*group_size=8"):
        ops._infonce_fwd(q, torch.randn(7, 16, device="cuda", dtype=torch.bfloat16), 2, 0.1, True)
    lse = torch.zeros(4, device="cuda")
    with pytest.raises(ERR, match=r"nvembed::infonce: docs\.size\(0\)=10 is not queries"):
        ops._infonce_bwd(torch.tensor(1.0, device="cuda"), q, torch.randn(10, 16, device="cuda",
                                                                          dtype=torch.bfloat16), lse, 2, 0.1, False)


def test_bad_inputs():
    q = torch.randn(4, 8, device="cuda")
    docs = torch.randn(8, 8, device="cuda")
    with pytest.raises(ERR, match=r"nvembed::infonce: .*queries"):
        ops._infonce_fwd(q.double(), docs.double(), 2, 0.1, True)
    with pytest.raises(ERR, match=r"nvembed::infonce: .*docs"):
        ops._infonce_fwd(q, docs.cpu(), 2, 0.1, True)
    with pytest.raises(ERR, match=r"nvembed::infonce: .*temperature"):
        ops._infonce_fwd(q, docs, 2, math.nan, True)
    # the CPU launcher's checks, shared: 1/t beyond float32 (the loss was NaN) and B*G wrapping around int64 (a wrapped
    # count passed the docs checks and the kernels indexed docs[i*G] out of bounds)
    with pytest.raises(ERR, match=r"nvembed::infonce: temperature=1e-39 is too small"):
        ops._infonce_fwd(q, docs, 2, 1e-39, True)
    with pytest.raises(ERR, match=r"nvembed::infonce: queries\.size\(0\)\*group_size overflows int64"):
        ops._infonce_fwd(q, docs[:4], 2 ** 62 + 1, 0.1, True)
    with pytest.raises(ERR, match=r"nvembed::infonce: .*lse"):
        ops._infonce_bwd(torch.tensor(1.0, device="cuda"), q, docs, torch.zeros(3, device="cuda"), 2, 0.1, True)
