"""nvembed::infonce against the fp64 reference (nvembed_ext.reference.infonce_ref), plus opcheck, gradcheck,
torch.compile and argument checks."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import nvembed_ext  # noqa: F401  (registers torch.ops.nvembed.*)
from nvembed_ext.reference import infonce_ref

ops = torch.ops.nvembed

# Relative error ||out - ref|| / ||ref|| against the fp64 reference, per input dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-10}

SHAPES = list(itertools.product([1, 3, 17, 300], [1, 8], [32, 257]))  # (B, G, d); 300 > one 128-row tile


def make_inputs(B, G, d, dtype, device="cpu", requires_grad=True, seed=None):
    """Fresh random unit-norm embeddings (as NV-Embed trains with), so logits / t stay O(1 / t) like in practice."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    q = F.normalize(torch.randn(B, d, generator=gen, dtype=torch.float64), dim=-1)
    docs = F.normalize(torch.randn(B * G, d, generator=gen, dtype=torch.float64), dim=-1)
    q = q.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    docs = docs.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return q, docs


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    if denom == 0:  # e.g. B = 1, G = 1, no in-batch negatives: one logit, loss 0, gradients 0
        return (out - ref).norm().item()
    return ((out - ref).norm() / denom).item()


def run_op(q, docs, G, t, inb):
    loss = ops.infonce(q, docs, G, t, inb)
    loss.backward()
    return loss, q.grad, docs.grad


def run_ref(q, docs, G, t, inb, dtype=torch.float64):
    qr = q.detach().to(dtype).requires_grad_()
    dr = docs.detach().to(dtype).requires_grad_()
    loss = infonce_ref(qr, dr, G, t, inb)
    loss.backward()
    return loss, qr.grad, dr.grad


def check_against_ref(q, docs, G, t, inb, dtype):
    loss, gq, gd = run_op(q, docs, G, t, inb)
    ref_loss, ref_gq, ref_gd = run_ref(q, docs, G, t, inb)
    assert loss.dim() == 0
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gq.dtype == dtype and gd.dtype == dtype
    assert gq.shape == q.shape and gd.shape == docs.shape
    # Tolerance: the per-dtype table, or (FA2's rule) twice the error of PyTorch's own reference computed in the
    # input dtype, whichever is larger. The latter matters where fp32 itself cannot do better: e.g. B = 1 with a
    # dominant positive at t = 0.02 gives loss = lse - s_target ~ 1e-3 from two logits ~ 50 (cancellation).
    # The loss is a log of a sum >= 1: its absolute fp32 floor is a few ulp(1), whatever the relative error.
    same = run_ref(q, docs, G, t, inb, dtype=dtype) if dtype != torch.float64 else (ref_loss, ref_gq, ref_gd)
    eps = torch.finfo(dtype).eps
    loss_floor = 4 * eps / max(abs(ref_loss.item()), 1e-30)
    # The fp64 reference's own floor: cross_entropy forms the positive's coefficient as softmax - 1, which with a
    # dominant positive (tiny gradients) loses ~eps64 absolutely, i.e. an error ~eps64 * |d_pos| / (B t) in each
    # gradient row (the kernels form it as -(sum of the other probabilities) and are more accurate there).
    B = q.shape[0]
    ref_floor = 8 * torch.finfo(torch.float64).eps / (B * t)
    gq_floor = ref_floor * docs.detach()[::G][:B].double().norm().item() / max(ref_gq.norm().item(), 1e-300)
    gd_floor = ref_floor * q.detach().double().norm().item() / max(ref_gd.norm().item(), 1e-300)
    for name, out, ref, torch_out, floor in (("loss", loss, ref_loss, same[0], loss_floor),
                                             ("grad_queries", gq, ref_gq, same[1], gq_floor),
                                             ("grad_docs", gd, ref_gd, same[2], gd_floor)):
        tol = max(TOL[dtype], 2 * rel_err(torch_out, ref), floor)
        assert rel_err(out, ref) <= tol, (name, rel_err(out, ref), tol)


# ---- CPU accuracy ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inb", [True, False], ids=["inbatch", "owngroup"])
@pytest.mark.parametrize("t", [0.02, 1.0])
@pytest.mark.parametrize("B,G,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference_cpu(B, G, d, t, inb, dtype):
    q, docs = make_inputs(B, G, d, dtype)
    check_against_ref(q, docs, G, t, inb, dtype)


def test_lse_output_cpu():
    B, G, d, t = 37, 4, 48, 0.05
    q, docs = make_inputs(B, G, d, torch.float32, requires_grad=False)
    loss, lse = ops._infonce_fwd(q, docs, G, t, True)
    ref = torch.logsumexp(q.double() @ docs.double().T / t, dim=-1)
    assert lse.shape == (B,) and lse.dtype == torch.float32
    assert rel_err(lse, ref) <= 1e-6
    _, lse_own = ops._infonce_fwd(q, docs, G, t, False)
    ref_own = torch.logsumexp(torch.einsum("bd,bgd->bg", q.double(), docs.double().view(B, G, d)) / t, dim=-1)
    assert rel_err(lse_own, ref_own) <= 1e-6


def test_non_contiguous_inputs_cpu():
    B, G, d = 19, 3, 40
    qt, dt = make_inputs(B, G, 2 * d, torch.float32, requires_grad=False)
    q = qt[:, ::2].requires_grad_()  # strided views
    docs = dt[:, 1::2].requires_grad_()
    assert not q.is_contiguous() and not docs.is_contiguous()
    check_against_ref(q, docs, G, 0.1, True, torch.float32)


def test_extreme_logits_cpu():
    """Unnormalized inputs with a small temperature: logits in the thousands, most softmax terms underflow."""
    B, G, d = 64, 8, 64
    q = (torch.randn(B, d) * 3).requires_grad_()
    docs = (torch.randn(B * G, d) * 3).requires_grad_()
    loss, gq, gd = run_op(q, docs, G, 0.02, True)
    ref_loss, ref_gq, ref_gd = run_ref(q, docs, G, 0.02, True)
    assert torch.isfinite(loss) and torch.isfinite(gq).all() and torch.isfinite(gd).all()
    # logits ~ 1e3-1e4: fp32 rounding of the logits alone is ~1e-4 relative to the gradient entries
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(gq, ref_gq) <= 1e-3 and rel_err(gd, ref_gd) <= 1e-3


def test_grad_loss_scaling_cpu():
    B, G, d = 33, 2, 16
    q, docs = make_inputs(B, G, d, torch.float32, requires_grad=False)
    loss, lse = ops._infonce_fwd(q, docs, G, 0.1, True)
    g1 = ops._infonce_bwd(torch.tensor(1.0), q, docs, lse, G, 0.1, True)
    g3 = ops._infonce_bwd(torch.tensor(-2.5), q, docs, lse, G, 0.1, True)
    torch.testing.assert_close(g3[0], -2.5 * g1[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g3[1], -2.5 * g1[1], rtol=1e-5, atol=1e-7)


def test_deterministic_across_thread_counts_cpu():
    B, G, d = 300, 8, 64
    q, docs = make_inputs(B, G, d, torch.float32, requires_grad=False)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, max(2, old)):
            torch.set_num_threads(n)
            loss, lse = ops._infonce_fwd(q, docs, G, 0.05, True)
            outs.append((loss, lse, *ops._infonce_bwd(torch.tensor(1.0), q, docs, lse, G, 0.05, True)))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- extra negatives: docs = [B*G grouped rows | E rows that are negatives for every query] ---------------------

def make_inputs_extra(B, G, E, d, dtype, requires_grad=True):
    q, docs = make_inputs(B, G, d, torch.float64, requires_grad=False)
    extra = F.normalize(torch.randn(E, d, dtype=torch.float64), dim=-1)
    docs = torch.cat([docs, extra])
    return q.to(dtype).requires_grad_(requires_grad), docs.to(dtype).requires_grad_(requires_grad)


# (B, G, E, d): B = 1, E = 1, E prime / not a multiple of anything, E > one 512-doc tile, B > one 128-query tile,
# E = 0 (the plain layout through the same path).
EXTRA_SHAPES = [(1, 1, 1, 16), (1, 4, 1, 33), (3, 2, 7, 32), (5, 3, 0, 24), (17, 8, 601, 64), (1, 1, 1031, 40),
                (130, 2, 523, 48)]


@pytest.mark.parametrize("t", [0.02, 1.0])
@pytest.mark.parametrize("B,G,E,d", EXTRA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_extra_negatives_match_reference_cpu(B, G, E, d, t, dtype):
    q, docs = make_inputs_extra(B, G, E, d, dtype)
    check_against_ref(q, docs, G, t, True, dtype)


def test_extra_negatives_change_the_loss_cpu():
    """The extra rows really enter the softmax: the loss equals the reference with them, not without them."""
    B, G, E, d, t = 6, 2, 9, 16, 0.05
    q, docs = make_inputs_extra(B, G, E, d, torch.float64, requires_grad=False)
    with_extra = ops.infonce(q, docs, G, t, True)
    without = ops.infonce(q, docs[:B * G], G, t, True)
    assert with_extra > without  # more negatives, larger log-sum-exp
    torch.testing.assert_close(with_extra, infonce_ref(q, docs, G, t, True), rtol=1e-12, atol=0)


def test_extra_negatives_lse_cpu():
    B, G, E, d, t = 9, 3, 517, 20, 0.05
    q, docs = make_inputs_extra(B, G, E, d, torch.float32, requires_grad=False)
    _, lse = ops._infonce_fwd(q, docs, G, t, True)
    assert rel_err(lse, torch.logsumexp(q.double() @ docs.double().T / t, dim=-1)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_extra_negatives(dtype):
    q, docs = make_inputs_extra(5, 3, 11, 24, dtype)
    torch.library.opcheck(ops._infonce_fwd, (q, docs, 3, 0.1, True))
    torch.library.opcheck(ops.infonce, (q, docs, 3, 0.1, True))
    _, lse = ops._infonce_fwd(q.detach(), docs.detach(), 3, 0.1, True)
    torch.library.opcheck(ops._infonce_bwd, (torch.tensor(1.0, dtype=dtype), q.detach(), docs.detach(), lse, 3, 0.1,
                                             True), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("B,G,E,d", [(1, 1, 1, 3), (3, 2, 5, 4)])
def test_gradcheck_extra_negatives(B, G, E, d):
    q, docs = make_inputs_extra(B, G, E, d, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ops.infonce(a, b, G, 0.5, True), (q, docs))


# ---- the blocked-GEMM backward (NVEMBED_INFONCE_BWD=gemm) on CPU tensors -------------------------------------------
# The CUDA path's loop (csrc/infonce_gemm.cpp) with ATen's elementwise pass instead of the CUDA chunk kernel (that
# one is checked by tools/infonce_emu). (block, chunk) widths that split groups, put a query's positive in a later
# block than its own row would, leave 1-column and ragged last blocks / chunks, a chunk narrower than its block
# (probabilities written into a strided buffer), and one block for everything.
GEMM_WIDTHS = [(1, 1), (3, 3), (7, 3), (9, 2), (256, 64), (None, None)]

@pytest.fixture
def gemm_bwd(monkeypatch):
    monkeypatch.setenv("NVEMBED_INFONCE_BWD", "gemm")
    return monkeypatch


def set_widths(monkeypatch, block, chunk):
    for var, value in (("NVEMBED_INFONCE_BLOCK_COLS", block), ("NVEMBED_INFONCE_CHUNK_COLS", chunk)):
        if value is not None:
            monkeypatch.setenv(var, str(value))


def test_gemm_bwd_equals_tiles_cpu(monkeypatch):
    """Same gradients as the tile kernels (fp64: to rounding), and the default chunking splits N > budget."""
    q, docs = make_inputs_extra(40, 4, 77, 24, torch.float64, requires_grad=False)
    _, lse = ops._infonce_fwd(q, docs, 4, 0.05, True)
    g = torch.tensor(0.7, dtype=torch.float64)
    monkeypatch.setenv("NVEMBED_INFONCE_BWD", "tiles")
    tiles = ops._infonce_bwd(g, q, docs, lse, 4, 0.05, True)
    monkeypatch.setenv("NVEMBED_INFONCE_BWD", "gemm")
    monkeypatch.setenv("NVEMBED_INFONCE_BLOCK_MB", "1")  # at least 4096 columns: one block for all 237 docs
    gemm = ops._infonce_bwd(g, q, docs, lse, 4, 0.05, True)
    set_widths(monkeypatch, 11, 5)
    gemm5 = ops._infonce_bwd(g, q, docs, lse, 4, 0.05, True)
    for a, b, c in zip(tiles, gemm, gemm5):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("var,value,match", [
    ("NVEMBED_INFONCE_BWD", "cublas", r"nvembed::infonce: NVEMBED_INFONCE_BWD must be auto, tiles or gemm, got "
                                      r"'cublas'"),
    ("NVEMBED_INFONCE_CHUNK_COLS", "0", r"nvembed::infonce: NVEMBED_INFONCE_CHUNK_COLS must be a positive integer, "
                                        r"got '0'"),
    ("NVEMBED_INFONCE_BLOCK_COLS", "-3", r"nvembed::infonce: NVEMBED_INFONCE_BLOCK_COLS must be a positive integer, "
                                         r"got '-3'"),
    ("NVEMBED_INFONCE_BLOCK_MB", "lots", r"nvembed::infonce: NVEMBED_INFONCE_BLOCK_MB must be a positive integer, "
                                         r"got 'lots'"),
])
def test_gemm_bwd_bad_variables_cpu(gemm_bwd, var, value, match):
    gemm_bwd.setenv(var, value)
    q, docs = make_inputs(4, 2, 8, torch.float32, requires_grad=False)
    _, lse = ops._infonce_fwd(q, docs, 2, 0.1, True)
    with pytest.raises(ValueError, match=match):
        ops._infonce_bwd(torch.tensor(1.0), q, docs, lse, 2, 0.1, True)


# ---- the GEMM forward (NVEMBED_INFONCE_FWD=gemm) on CPU tensors ---------------------------------------------------
# The CUDA path's loop (csrc/infonce_gemm.cpp: chunks of GEMM logits, an online log-sum-exp per row) with ATen's
# elementwise pass instead of the CUDA kernel (that one is checked by tools/infonce_emu). Chunk widths that split
# groups, put a row's positive in a later chunk, leave 1-column and ragged last chunks, and one chunk for all.

@pytest.fixture
def gemm_fwd(monkeypatch):
    monkeypatch.setenv("NVEMBED_INFONCE_FWD", "gemm")
    return monkeypatch


def test_gemm_fwd_equals_tiles_cpu(monkeypatch):
    """Same loss and lse as the tile kernel (fp64: to rounding), for several chunk widths and with both backwards."""
    q, docs = make_inputs_extra(40, 4, 77, 24, torch.float64, requires_grad=False)
    monkeypatch.setenv("NVEMBED_INFONCE_FWD", "tiles")
    loss, lse = ops._infonce_fwd(q, docs, 4, 0.05, True)
    monkeypatch.setenv("NVEMBED_INFONCE_FWD", "gemm")
    for chunk in (None, "5", "237"):
        if chunk is not None:
            monkeypatch.setenv("NVEMBED_INFONCE_CHUNK_COLS", chunk)
        loss2, lse2 = ops._infonce_fwd(q, docs, 4, 0.05, True)
        assert loss2.dtype == loss.dtype and lse2.dtype == lse.dtype and loss2.dim() == 0
        torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(lse2, lse, rtol=1e-12, atol=1e-15)


def test_gemm_fwd_bad_variable_cpu(gemm_fwd):
    gemm_fwd.setenv("NVEMBED_INFONCE_FWD", "cublas")
    q, docs = make_inputs(9, 3, 16, torch.float64, requires_grad=False)
    with pytest.raises(ValueError, match=r"nvembed::infonce: NVEMBED_INFONCE_FWD must be auto, tiles or gemm, got "
                                         r"'cublas'"):
        ops._infonce_fwd(q, docs, 3, 0.1, True)


# ---- gradients formed in the forward (NVEMBED_INFONCE_GRAD=fused) on CPU tensors ---------------------------------
# The CUDA path's loop (csrc/infonce_gemm.cpp: row blocks of queries, each against all docs; the loss and the
# gradients for an upstream gradient of 1 in one pass; the backward scales them) with ATen's elementwise passes
# instead of the CUDA chunk kernels (those are checked by tools/infonce_emu, negative col0 included). Row blocks of
# 1 (every query alone), 2 and 7 (a ragged last block, a block's targets in the middle of the docs), and one block
# for all (no dD accumulation); the accumulators (fp32, or the output itself) and the probabilities written over the
# scores.

@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("NVEMBED_INFONCE_GRAD", "fused")
    return monkeypatch


def _grad_fn_name(loss):
    return type(loss.grad_fn).__name__


def test_fused_grad_path_and_upstream_scale_cpu(fused):
    """The public op takes the fused path only where gradients are wanted; the backward scales the forward's
    gradients by the upstream gradient (here 0.3 via the loss's use, and 0 for one input that needs none)."""
    q, docs = make_inputs_extra(9, 3, 4, 16, torch.float64)
    loss = ops.infonce(q, docs, 3, 0.05, True)
    assert "_infonce_fwd_grad" in _grad_fn_name(loss)
    (loss * 0.3).backward()
    ref_loss, ref_gq, ref_gd = run_ref(q, docs, 3, 0.05, True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(q.grad, 0.3 * ref_gq, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(docs.grad, 0.3 * ref_gd, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        assert ops.infonce(q, docs, 3, 0.05, True).grad_fn is None
    assert ops.infonce(q.detach(), docs.detach(), 3, 0.05, True).grad_fn is None
    docs_only = ops.infonce(q.detach(), docs, 3, 0.05, True)  # frozen query tower: docs alone need gradients
    assert "_infonce_fwd_grad" in _grad_fn_name(docs_only)
    docs.grad = None
    docs_only.backward()
    torch.testing.assert_close(docs.grad, ref_gd, rtol=1e-12, atol=1e-14)
    # own-group softmax: no B x N matrix to save a pass over; the usual forward and backward
    q2, docs2 = make_inputs(5, 3, 8, torch.float64)
    assert "_infonce_fwd_default" in _grad_fn_name(ops.infonce(q2, docs2, 3, 0.05, False))


def test_fused_grad_retain_graph_cpu(fused):
    """An upstream gradient of 1 hands the forward's gradients over without a copy; a retained graph's second
    backward (and a third, scaled) still finds them intact: the leaves' gradients accumulate 1 + 1 + 0.5 times."""
    q, docs = make_inputs_extra(9, 3, 4, 16, torch.float64)
    loss = ops.infonce(q, docs, 3, 0.05, True)
    assert "_infonce_fwd_grad" in _grad_fn_name(loss)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    (loss * 0.5).backward()
    _, ref_gq, ref_gd = run_ref(q, docs, 3, 0.05, True)
    torch.testing.assert_close(q.grad, 2.5 * ref_gq, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(docs.grad, 2.5 * ref_gd, rtol=1e-12, atol=1e-14)


def test_fused_grad_backward_hands_over_without_copy_cpu():
    """A freed graph: the backward scales the forward's own gradient tensors in place and passes them on (no second
    copy, any upstream gradient); a retained graph gets new tensors (its saved gradients stay intact)."""
    q, docs = make_inputs_extra(9, 3, 4, 16, torch.float32)
    seen = []
    q.register_hook(lambda g: seen.append(g.data_ptr()))
    for scale, retain in ((1.0, False), (0.5, False), (1.0, True), (0.25, True)):
        loss, gq, _ = ops._infonce_fwd_grad(q, docs, 3, 0.05, True)
        before = gq.clone()
        (loss * scale).backward(retain_graph=retain)
        assert (seen[-1] == gq.data_ptr()) == (not retain), (scale, retain)
        torch.testing.assert_close(gq, before * scale if not retain else before, rtol=0, atol=0)


def test_fused_grad_equals_backward_cpu(monkeypatch):
    """The same loss and gradients as the tile kernels' forward + backward (fp64: to rounding), for one block, ragged
    blocks of 11 and a small budget (still one block: all 40 rows of scores fit 1 MiB)."""
    q, docs = make_inputs_extra(40, 4, 77, 24, torch.float64, requires_grad=False)
    loss, lse = ops._infonce_fwd(q, docs, 4, 0.05, True)
    gq, gd = ops._infonce_bwd(torch.tensor(1.0, dtype=torch.float64), q, docs, lse, 4, 0.05, True)
    for env in ({}, {"NVEMBED_INFONCE_ROW_BLOCK": "11"}, {"NVEMBED_INFONCE_FUSED_MB": "1"}):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        loss2, gq2, gd2 = ops._infonce_fwd_grad(q, docs, 4, 0.05, True)
        assert loss2.dtype == loss.dtype and loss2.dim() == 0 and gq2.dtype == q.dtype and gd2.shape == docs.shape
        for a, b in ((loss2, loss), (gq2, gq), (gd2, gd)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # own-group mode of the internal op: the forward, then the backward for an upstream gradient of 1
    q, docs = make_inputs(6, 3, 8, torch.float64, requires_grad=False)
    loss, lse = ops._infonce_fwd(q, docs, 3, 0.2, False)
    gq, gd = ops._infonce_bwd(torch.tensor(1.0, dtype=torch.float64), q, docs, lse, 3, 0.2, False)
    loss2, gq2, gd2 = ops._infonce_fwd_grad(q, docs, 3, 0.2, False)
    for a, b in ((loss2, loss), (gq2, gq), (gd2, gd)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_grad_rows_budget(monkeypatch):
    """Past the budget (1 MiB here) the row blocks are at least 1024 queries (blocks of 1024 + 1024 + 1024 + 1024 + 4,
    the fp32 output accumulating them): the same loss and gradients as the tile kernels."""
    q, docs = make_inputs(4100, 1, 3, torch.float32, requires_grad=False, seed=3)
    loss, lse = ops._infonce_fwd(q, docs, 1, 0.05, True)
    gq, gd = ops._infonce_bwd(torch.tensor(1.0), q, docs, lse, 1, 0.05, True)
    for budget, plan in ((None, {"rows": 4100, "accumulator": "none"}), ("1", {"rows": 1024, "accumulator": "output"})):
        if budget is not None:
            monkeypatch.setenv("NVEMBED_INFONCE_FUSED_MB", budget)
        assert nvembed_ext._C.infonce_fused_plan(4100, 4100, 3, 4) == plan
        loss2, gq2, gd2 = ops._infonce_fwd_grad(q, docs, 1, 0.05, True)
        torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gq2, gq, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(gd2, gd, rtol=1e-4, atol=1e-7)


MiB = 1 << 20


@pytest.mark.parametrize("env,args,plan", [
    # all B rows' scores fit the budget (1 GiB): one block, dD written once
    ({}, (4096, 32768, 4096, 2), (4096, "none")),
    # the B = 16384: the fp32 accumulator (2 GiB at d = 4096; 512 MiB + 4096 rows of 512 KiB at d = 1024)
    # does not fit 1 GiB: the output accumulates, blocks of 2048 rows fill the budget
    ({}, (16384, 131072, 4096, 2), (2048, "output")),
    ({}, (16384, 131072, 1024, 2), (2048, "output")),
    # B = 65536, N = 524288: 512 rows would fill 1 GiB; at least 1024 (the output's traffic against the GEMMs)
    ({}, (65536, 524288, 4096, 2), (1024, "output")),
    # a budget with room for the accumulator and >= 4096 rows beside it: (4096 - 512) MiB / 512 KiB = 7168 rows
    ({"FUSED_MB": 4096}, (16384, 131072, 1024, 2), (7168, "fp32")),
    # fp32 / fp64 inputs: the output is the accumulator; fp64 scores take 8 bytes
    ({"FUSED_MB": 4096}, (16384, 131072, 1024, 4), (8192, "output")),
    ({"FUSED_MB": 4096}, (16384, 131072, 1024, 8), (4096, "output")),
    ({"FUSED_ACC": "fp32"}, (16384, 131072, 1024, 4), (2048, "output")),
    # forced accumulators: fp32 keeps >= 4096 rows; output with everything in one block is one write
    ({"FUSED_ACC": "fp32"}, (16384, 131072, 4096, 2), (4096, "fp32")),
    ({"FUSED_ACC": "output"}, (4096, 32768, 4096, 2), (4096, "none")),
    ({"FUSED_ACC": "output"}, (1100, 223696, 64, 2), (1100, "none")),  # fits, though more than 1024 rows would not
    ({"FUSED_ACC": "output", "FUSED_MB": 4096}, (16384, 131072, 1024, 2), (8192, "output")),
    # forced rows: auto takes the fp32 accumulator where it fits the budget beside the block
    ({"ROW_BLOCK": 100}, (1000, 8000, 64, 2), (100, "fp32")),
    ({"ROW_BLOCK": 100, "FUSED_MB": 1}, (1000, 8000, 64, 2), (100, "output")),
    ({"ROW_BLOCK": 100, "FUSED_ACC": "output"}, (1000, 8000, 64, 2), (100, "output")),
    ({"ROW_BLOCK": 5000}, (1000, 8000, 64, 2), (1000, "none")),
    ({"ROW_BLOCK": 3}, (1, 1, 1, 2), (1, "none")),
])
def test_fused_plan(monkeypatch, env, args, plan):
    for var, value in env.items():
        monkeypatch.setenv(f"NVEMBED_INFONCE_{var}", str(value))
    assert nvembed_ext._C.infonce_fused_plan(*args) == {"rows": plan[0], "accumulator": plan[1]}


def test_fused_accumulators_over_several_parts_cpu(monkeypatch):
    """d = 16384: the GEMM parts hold 1024 rows (64 MiB of fp32), so the fp32 accumulator's update of N = 1100 docs
    and dQ's are split into parts; ragged row blocks of 40 queries; both accumulators against the reference."""
    q, docs = make_inputs_extra(100, 11, 0, 16384, torch.bfloat16)
    _, ref_gq, ref_gd = run_ref(q, docs, 11, 0.05, True)
    monkeypatch.setenv("NVEMBED_INFONCE_ROW_BLOCK", "40")
    for acc in ("fp32", "output"):
        monkeypatch.setenv("NVEMBED_INFONCE_FUSED_ACC", acc)
        assert nvembed_ext._C.infonce_fused_plan(100, 1100, 16384, 2) == {"rows": 40, "accumulator": acc}
        _, gq, gd = ops._infonce_fwd_grad(q.detach(), docs.detach(), 11, 0.05, True)
        assert rel_err(gq, ref_gq) < 1e-2 and rel_err(gd, ref_gd) < 1e-2, acc


def test_fused_plan_bad_accumulator(monkeypatch):
    monkeypatch.setenv("NVEMBED_INFONCE_FUSED_ACC", "bf16")
    with pytest.raises(ValueError, match=r"nvembed::infonce: NVEMBED_INFONCE_FUSED_ACC must be auto, fp32 or output, "
                                         r"got 'bf16'"):
        nvembed_ext._C.infonce_fused_plan(16, 16, 8, 2)
    monkeypatch.setenv("NVEMBED_INFONCE_GRAD", "fused")
    q, docs = make_inputs(9, 3, 16, torch.bfloat16)
    with pytest.raises(ValueError, match=r"nvembed::infonce: NVEMBED_INFONCE_FUSED_ACC must be auto, fp32 or output"):
        ops.infonce(q, docs, 3, 0.05, True)


def test_fused_probabilities_written_over_scores_cpu(monkeypatch):
    """The probabilities overlay the scores (a bf16 view with twice the row stride): a row block's peak is its fp32
    scores alone. On CPU tensors the ATen pass goes through a copy; the CUDA kernel's in-place loop is checked by
    tools/infonce_emu. Here: every accumulator and the reference on ragged blocks whose targets sit mid-row."""
    q, docs = make_inputs_extra(37, 3, 11, 24, torch.bfloat16)
    results = []
    for acc in ("fp32", "output"):
        monkeypatch.setenv("NVEMBED_INFONCE_FUSED_ACC", acc)
        monkeypatch.setenv("NVEMBED_INFONCE_ROW_BLOCK", "10")
        assert nvembed_ext._C.infonce_fused_plan(37, 122, 24, 2) == {"rows": 10, "accumulator": acc}
        results.append(ops._infonce_fwd_grad(q.detach(), docs.detach(), 3, 0.05, True))
    monkeypatch.delenv("NVEMBED_INFONCE_ROW_BLOCK")
    results.append(ops._infonce_fwd_grad(q.detach(), docs.detach(), 3, 0.05, True))  # one block
    _, ref_gq, ref_gd = run_ref(q, docs, 3, 0.05, True)
    for loss, gq, gd in results:
        assert rel_err(gq, ref_gq) < 1e-2 and rel_err(gd, ref_gd) < 1e-2
    # the loss does not depend on the accumulator (same blocks: equal), nor, beyond its row sums' order, on the blocks
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[2][0], results[0][0], rtol=1e-6, atol=0)


# ---- the three GEMM paths against the fp64 reference, one parametrization ----------------------------------------
def _env(**variables):
    return {f"NVEMBED_INFONCE_{k}": str(v) for k, v in variables.items() if v is not None}


# the environment of each path and width (ids: path-widths)
GEMM_PATHS = (
    [pytest.param(_env(BWD="gemm", BLOCK_COLS=b, CHUNK_COLS=c), id=f"bwd-{b}x{c}") for b, c in GEMM_WIDTHS]
    + [pytest.param(_env(FWD="gemm", CHUNK_COLS=c), id=f"fwd-{c}") for c in (1, 3, 7, 64, None)]
    + [pytest.param(_env(GRAD="fused", ROW_BLOCK=r), id=f"fused-{r}") for r in (1, 2, 7, None)]
    # the dD accumulator forced: the block updates added into the output in its dtype (one rounding per block; 130
    # of them at B = 130 in row blocks of 1), and the fp32 accumulator
    + [pytest.param(_env(GRAD="fused", FUSED_ACC="output", ROW_BLOCK=r), id=f"fused-output-{r}") for r in (1, 7)]
    + [pytest.param(_env(GRAD="fused", FUSED_ACC="fp32", ROW_BLOCK=7), id="fused-fp32-7")])


@pytest.mark.parametrize("t", [0.02, 1.0])
@pytest.mark.parametrize("B,G,E,d", [(1, 1, 0, 16), (1, 4, 1, 33), (3, 2, 7, 32), (17, 8, 601, 64), (130, 2, 5, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("env", GEMM_PATHS)
def test_gemm_paths_match_reference_cpu(monkeypatch, env, dtype, B, G, E, d, t):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    q, docs = make_inputs_extra(B, G, E, d, dtype)
    check_against_ref(q, docs, G, t, True, dtype)


@pytest.mark.parametrize("env", [
    pytest.param(_env(BWD="gemm", BLOCK_COLS=3, CHUNK_COLS=2), id="bwd-3x2"),
    pytest.param(_env(BWD="gemm"), id="bwd"),
    pytest.param(_env(FWD="gemm", CHUNK_COLS=3), id="fwd-3+tiles-bwd"),
    pytest.param(_env(FWD="gemm", CHUNK_COLS=3, BWD="gemm"), id="fwd-3+gemm-bwd"),
    pytest.param(_env(GRAD="fused", ROW_BLOCK=2), id="fused-2"),
    pytest.param(_env(GRAD="fused"), id="fused")])
def test_gemm_paths_gradcheck_cpu(monkeypatch, env):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    q, docs = make_inputs_extra(3, 2, 5, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ops.infonce(a, b, 2, 0.5, True), (q, docs))


@pytest.mark.parametrize("env", [_env(BWD="gemm"), _env(FWD="gemm"), _env(GRAD="fused")], ids=["bwd", "fwd", "fused"])
def test_gemm_paths_own_group_cpu(monkeypatch, env):
    """Without in-batch negatives there is no B x N matrix: the variables change nothing there."""
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    q, docs = make_inputs(9, 3, 16, torch.float64)
    check_against_ref(q, docs, 3, 0.05, False, torch.float64)


@pytest.mark.parametrize("inb", [True, False])
def test_opcheck_fwd_grad(inb):
    q, docs = make_inputs(5, 3, 24, torch.float32)
    torch.library.opcheck(ops._infonce_fwd_grad, (q, docs, 3, 0.1, inb),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_temperature_beyond_float32_range_is_an_error():
    """1/t is applied in float32 for float32 / bf16 inputs: a temperature whose inverse overflows it is an error
    naming the argument (the loss was NaN), in the op and in its fake; float64 inputs take it."""
    q, docs = make_inputs(3, 2, 4, torch.float64)
    for dt in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match=r"nvembed::infonce: temperature=1e-39 is too small"):
            ops.infonce(q.to(dt), docs.to(dt), 2, 1e-39, True)
        qd, dd = q.detach().to(dt), docs.detach().to(dt)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fq, fd = mode.from_tensor(qd), mode.from_tensor(dd)
            with pytest.raises(ValueError, match=r"nvembed::infonce: temperature=1e-39 is too small"):
                ops.infonce(fq, fd, 2, 1e-39, True)
    loss, _, _ = run_ref(q * 1e-20, docs * 1e-20, 2, 1e-39, True)
    assert torch.isfinite(ops.infonce(q * 1e-20, docs * 1e-20, 2, 1e-39, True)) and torch.isfinite(loss)


@pytest.mark.parametrize("grad", ["backward", "fused"])
def test_double_backward_raises(monkeypatch, grad):
    """First-order gradients with create_graph=True work; differentiating them again is a clear error on both
    gradient paths (not torch's not-implemented warning and a silent zero)."""
    monkeypatch.setenv("NVEMBED_INFONCE_GRAD", grad)
    q, docs = make_inputs(4, 2, 8, torch.float64)
    gq, = torch.autograd.grad(ops.infonce(q, docs, 2, 0.5, True), q, create_graph=True)
    ref_loss, ref_gq, _ = run_ref(q, docs, 2, 0.5, True)
    torch.testing.assert_close(gq.detach(), ref_gq, rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError, match=r"nvembed::infonce: second derivatives are not implemented"):
        gq.square().sum().backward()


@pytest.mark.parametrize("var,value,match", [
    ("NVEMBED_INFONCE_GRAD", "forward", r"nvembed::infonce: NVEMBED_INFONCE_GRAD must be auto, backward or fused, "
                                        r"got 'forward'"),
    ("NVEMBED_INFONCE_ROW_BLOCK", "0", r"nvembed::infonce: NVEMBED_INFONCE_ROW_BLOCK must be a positive integer, "
                                      r"got '0'"),
    ("NVEMBED_INFONCE_FUSED_MB", "1.5", r"nvembed::infonce: NVEMBED_INFONCE_FUSED_MB must be a positive integer, "
                                        r"got '1.5'"),
])
def test_fused_grad_bad_variables_cpu(fused, var, value, match):
    fused.setenv(var, value)
    q, docs = make_inputs(4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=match):
        ops.infonce(q, docs, 2, 0.1, True)


@pytest.mark.parametrize("env", [{}, {"NVEMBED_INFONCE_BWD": "gemm"}, {"NVEMBED_INFONCE_FWD": "gemm"},
                                 {"NVEMBED_INFONCE_GRAD": "fused"}], ids=["tiles", "gemm-bwd", "gemm-fwd", "fused"])
@pytest.mark.parametrize("inb", [True, False])
def test_zero_width_embeddings(monkeypatch, env, inb):
    """d = 0: every logit is 0 (loss log of the softmax width), gradients empty; no path divides by d."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    q, docs = torch.zeros(4, 0, requires_grad=True), torch.zeros(4 * 2 + (3 if inb else 0), 0, requires_grad=True)
    loss, gq, gd = run_op(q, docs, 2, 0.1, inb)
    torch.testing.assert_close(loss, torch.tensor(math.log(11 if inb else 2)))
    assert gq.shape == q.shape and gd.shape == docs.shape


# ---- opcheck / gradcheck / compile ---------------------------------------------------------------------------------

@pytest.mark.parametrize("inb", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_fwd(inb, dtype):
    q, docs = make_inputs(5, 3, 24, dtype)
    torch.library.opcheck(ops._infonce_fwd, (q, docs, 3, 0.1, inb))


@pytest.mark.parametrize("inb", [True, False])
def test_opcheck_bwd(inb):
    q, docs = make_inputs(5, 3, 24, torch.float32, requires_grad=False)
    _, lse = ops._infonce_fwd(q, docs, 3, 0.1, inb)
    torch.library.opcheck(ops._infonce_bwd, (torch.tensor(1.0), q, docs, lse, 3, 0.1, inb),
                          test_utils=("test_schema", "test_faketensor"))  # not differentiable itself


@pytest.mark.parametrize("inb", [True, False])
def test_opcheck_public(inb):
    # The public op is CompositeImplicitAutograd over _infonce_fwd: opcheck's autograd-registration test accepts
    # that (autograd comes from _infonce_fwd's registration), so the full default set applies.
    q, docs = make_inputs(5, 3, 24, torch.float32)
    torch.library.opcheck(ops.infonce, (q, docs, 3, 0.1, inb))


@pytest.mark.parametrize("inb", [True, False])
@pytest.mark.parametrize("B,G,d", [(1, 1, 3), (3, 2, 5), (4, 3, 7)])
def test_gradcheck(B, G, d, inb):
    q, docs = make_inputs(B, G, d, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: ops.infonce(a, b, G, 0.5, inb), (q, docs))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("inb", [True, False])
@pytest.mark.parametrize("grad", ["backward", "fused"])
def test_torch_compile(inb, backend, grad, monkeypatch):
    """fullgraph compile of a loss function built on the op; its backward (compiled by AOTAutograd through the
    registered autograd formula) must match eager. Dynamo cannot trace .backward() itself, so it stays outside.
    grad=fused: the traced forward holds _infonce_fwd_grad (in-batch), the backward its scaling."""
    monkeypatch.setenv("NVEMBED_INFONCE_GRAD", grad)
    B, G, d, t = 20, 4, 32, 0.05

    def loss_fn(q, docs):
        return ops.infonce(q, docs, G, t, inb) * 2.0 + 1.0

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    q, docs = make_inputs(B, G, d, torch.float32, seed=1)
    q2, docs2 = q.detach().clone().requires_grad_(), docs.detach().clone().requires_grad_()
    loss = loss_fn(q, docs)
    loss.backward()
    loss_c = compiled(q2, docs2)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(q2.grad, q.grad)
    torch.testing.assert_close(docs2.grad, docs.grad)


# ---- bad inputs ----------------------------------------------------------------------------------------------------

ERR = (RuntimeError, ValueError, TypeError)


def _good(B=4, G=2, d=8, dtype=torch.float32):
    return torch.randn(B, d, dtype=dtype), torch.randn(B * G, d, dtype=dtype)


@pytest.mark.parametrize("fn", ["public", "fwd", "bwd", "fwd_grad"])
@pytest.mark.parametrize("case", [
    "queries_rank", "docs_rank", "queries_dtype_int", "queries_dtype_fp16", "dtype_mismatch", "d_mismatch",
    "docs_count", "group_size_zero", "group_size_negative", "temperature_zero", "temperature_negative",
    "temperature_nan", "temperature_inf", "empty_batch", "mixed_devices",
])
def test_bad_inputs(case, fn):
    q, docs = _good()
    G, t = 2, 0.1
    match = {
        "queries_rank": "queries", "docs_rank": "docs", "queries_dtype_int": "queries",
        "queries_dtype_fp16": "queries", "dtype_mismatch": "docs", "d_mismatch": r"docs\.size\(1\)",
        "docs_count": r"docs\.size\(0\)=6 is less than queries\.size\(0\)\*group_size=8",
        "group_size_zero": "group_size", "group_size_negative": "group_size", "temperature_zero": "temperature",
        "temperature_negative": "temperature", "temperature_nan": "temperature", "temperature_inf": "temperature",
        "empty_batch": r"queries\.size\(0\)", "mixed_devices": "docs",
    }[case]
    if case == "queries_rank":
        q = q[None]
    elif case == "docs_rank":
        docs = docs.view(4, 2, 8)
    elif case == "queries_dtype_int":
        q, docs = q.to(torch.int32), docs.to(torch.int32)
    elif case == "queries_dtype_fp16":  # CPU kernels take float32 / bfloat16 / float64
        q, docs = q.half(), docs.half()
    elif case == "dtype_mismatch":
        docs = docs.double()
    elif case == "d_mismatch":
        docs = torch.randn(8, 9)
    elif case == "docs_count":
        docs = docs[:6]
    elif case == "group_size_zero":
        G = 0
    elif case == "group_size_negative":
        G = -2
    elif case == "temperature_zero":
        t = 0.0
    elif case == "temperature_negative":
        t = -0.5
    elif case == "temperature_nan":
        t = math.nan
    elif case == "temperature_inf":
        t = math.inf
    elif case == "empty_batch":
        q, docs = torch.randn(0, 8), torch.randn(0, 8)
    elif case == "mixed_devices":
        # No second real device on a CPU-only runner: the meta device stands in (the fake kernel checks it too).
        docs = docs.to("cuda" if torch.cuda.is_available() else "meta")
    with pytest.raises(ERR, match=r"nvembed::infonce: .*" + match):
        if fn == "public":
            ops.infonce(q, docs, G, t, True)
        elif fn == "fwd":
            ops._infonce_fwd(q, docs, G, t, True)
        elif fn == "fwd_grad":
            ops._infonce_fwd_grad(q, docs, G, t, True)
        else:
            lse = torch.zeros(q.shape[0] if q.dim() >= 1 else 1)
            ops._infonce_bwd(torch.tensor(1.0), q, docs, lse, G, t, True)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: the fake kernel's checks, same messages
@pytest.mark.parametrize("fn", ["public", "fwd", "bwd"])
@pytest.mark.parametrize("n_docs,inb,match", [
    (10, False, r"docs\.size\(0\)=10 is not queries\.size\(0\)\*group_size=8 \(extra negative docs need "
                r"in_batch_negatives=True\)"),
    (6, False, r"docs\.size\(0\)=6 is not queries\.size\(0\)\*group_size=8$"),
    (7, True, r"docs\.size\(0\)=7 is less than queries\.size\(0\)\*group_size=8"),
], ids=["extra_rows_owngroup", "too_few_owngroup", "too_few_inbatch"])
def test_bad_docs_count(n_docs, inb, match, fn, device):
    """Extra rows are negatives only for the in-batch softmax; without it they would be ignored silently."""
    q, docs = torch.randn(4, 8, device=device), torch.randn(n_docs, 8, device=device)
    with pytest.raises(ERR, match=r"nvembed::infonce: " + match):
        if fn == "public":
            ops.infonce(q, docs, 2, 0.1, inb)
        elif fn == "fwd":
            ops._infonce_fwd(q, docs, 2, 0.1, inb)
        else:
            ops._infonce_bwd(torch.tensor(1.0, device=device), q, docs, torch.zeros(4, device=device), 2, 0.1, inb)


def test_group_size_overflow():
    q, docs = _good()
    with pytest.raises(ERR, match=r"nvembed::infonce: queries\.size\(0\)\*group_size overflows"):
        ops.infonce(q, docs, 2 ** 62, 0.1, True)
    with pytest.raises(ERR, match=r"nvembed::infonce: queries\.size\(0\)\*group_size overflows"):
        ops.infonce(q.to("meta"), docs.to("meta"), 2 ** 62, 0.1, True)


def test_bad_bwd_arguments():
    q, docs = _good()
    with pytest.raises(ERR, match=r"nvembed::infonce: .*lse"):
        ops._infonce_bwd(torch.tensor(1.0), q, docs, torch.zeros(3), 2, 0.1, True)
    with pytest.raises(ERR, match=r"nvembed::infonce: .*grad_loss"):
        ops._infonce_bwd(torch.ones(2), q, docs, torch.zeros(4), 2, 0.1, True)


# ---- CUDA ----------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("inb", [True, False], ids=["inbatch", "owngroup"])
@pytest.mark.parametrize("t", [0.02, 1.0])
@pytest.mark.parametrize("B,G,d", SHAPES + [(1000, 3, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_reference_cuda(B, G, d, t, inb, dtype):
    q, docs = make_inputs(B, G, d, dtype, device="cuda")
    check_against_ref(q, docs, G, t, inb, dtype)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("inb", [True, False])
def test_outputs_fully_written_cuda(inb):
    """Poison the caching allocator's free blocks with NaN: any output element the kernels skip stays NaN."""
    B, G, d = 131, 5, 70
    for _ in range(2):
        poison = torch.full((1 << 22,), float("nan"), device="cuda")
        del poison
        q, docs = make_inputs(B, G, d, torch.float32, device="cuda", requires_grad=False)
        loss, lse = ops._infonce_fwd(q, docs, G, 0.05, inb)
        poison = torch.full((1 << 22,), float("nan"), device="cuda")
        del poison
        gq, gd = ops._infonce_bwd(torch.tensor(1.0, device="cuda"), q, docs, lse, G, 0.05, inb)
        torch.cuda.synchronize()
        for x in (loss, lse, gq, gd):
            assert torch.isfinite(x).all()


@pytest.mark.cuda
@cuda
def test_opcheck_cuda():
    q, docs = make_inputs(70, 3, 40, torch.float32, device="cuda")
    torch.library.opcheck(ops._infonce_fwd, (q, docs, 3, 0.1, True))
    torch.library.opcheck(ops.infonce, (q, docs, 3, 0.1, False))


@pytest.mark.cuda
@cuda
def test_bad_inputs_cuda():
    q, docs = _good()
    with pytest.raises(ERR, match=r"nvembed::infonce: .*queries"):
        ops.infonce(q.cuda().double(), docs.cuda().double(), 2, 0.1, True)  # CUDA: fp32 / bf16 / fp16 only
    with pytest.raises(ERR, match=r"nvembed::infonce: .*docs"):
        ops.infonce(q.cuda(), docs, 2, 0.1, True)
