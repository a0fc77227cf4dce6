"""nvembed::flash_attn and nvembed::flash_attn_varlen on CPU (and CUDA where present) against the fp64
reference: outputs and all gradients, awkward shapes, GQA, masks, fully masked rows, bad input."""
import math

import pytest
import torch

import nvembed_ext  # noqa: F401
from nvembed_ext.reference import flash_attn_ref, flash_attn_varlen_ref
from conftest import ERR_TYPES, TOL, assert_close, rel_err, requires_cuda

ops = torch.ops.nvembed

SHAPES = [  # B, Lq, Lk, Hq, Hkv, D
    (1, 1, 1, 1, 1, 32),
    (2, 17, 17, 4, 4, 64),
    (2, 129, 33, 8, 2, 64),      # GQA 8/2, Lq != Lk
    (1, 333, 129, 4, 4, 128),
    (3, 17, 600, 2, 1, 32),      # MQA, more than one key block
    (1, 1, 333, 8, 2, 128),
]


def _inputs(B, Lq, Lk, Hq, Hkv, D, dtype=torch.float64, device="cpu"):
    q = torch.randn(B, Lq, Hq, D, dtype=dtype, device=device)
    k = torch.randn(B, Lk, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, Lk, Hkv, D, dtype=dtype, device=device)
    return q, k, v


def _random_mask(B, Lk, fully_masked_row=True):
    mask = torch.rand(B, Lk) > 0.3
    mask[:, 0] = True
    if fully_masked_row and B > 1:
        mask[B - 1] = False
    return mask


def _check_against_ref(q64, k64, v64, mask, dtype, scale=None, device="cpu"):
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q64, k64, v64))
    m = mask.to(device) if mask is not None else None
    out = ops.flash_attn(q, k, v, m, scale)
    assert out.dtype == dtype and out.shape == q.shape
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    ref = flash_attn_ref(qr, kr, vr, mask, scale)
    # PyTorch's own result in the same dtype, for the "at most 2x PyTorch's error" rule
    ql, kl, vl = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    low = flash_attn_ref(ql, kl, vl, mask, scale)
    assert_close(out, ref, dtype, "out", baseline=low)
    dout = torch.randn_like(ref)
    out.backward(dout.to(device=device, dtype=dtype))
    ref.backward(dout)
    low.backward(dout.to(dtype))
    for name, a, b, c in (("dq", q, qr, ql), ("dk", k, kr, kl), ("dv", v, vr, vl)):
        assert a.grad.dtype == dtype
        assert_close(a.grad, b.grad, dtype, name, baseline=c.grad)
    return out, (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_flash_attn_matches_reference(shape, dtype, masked):
    B, Lq, Lk, Hq, Hkv, D = shape
    q, k, v = _inputs(*shape)
    mask = _random_mask(B, Lk) if masked else None
    _check_against_ref(q, k, v, mask, dtype)


@pytest.mark.parametrize("brgemm", ["1", "0"], ids=["brgemm", "cblas"])
def test_bf16_forward_paths(monkeypatch, brgemm):
    """bf16 forward runs on oneDNN brgemm tiles where the CPU supports them, else on cblas tiles: test both."""
    monkeypatch.setenv("NVEMBED_CPU_BRGEMM", brgemm)
    for shape in [(2, 129, 600, 8, 2, 64), (1, 17, 33, 4, 4, 32), (2, 3, 1, 2, 1, 128)]:
        q, k, v = _inputs(*shape)
        _check_against_ref(q, k, v, _random_mask(shape[0], shape[2]), torch.bfloat16)
        out = ops.flash_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, -0.3)  # negative scale
        assert_close(out, flash_attn_ref(q, k, v, None, -0.3), torch.bfloat16, "out (scale < 0)")


@pytest.mark.parametrize("lk", [40, 600], ids=["one-block", "several-blocks"])
def test_nan_propagates_to_the_gradients(lk):
    """A NaN in a key makes every query's row NaN, and its gradients NaN as the reference's are; it is not taken for
    a row without keys (whose gradients are zero)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 16, dtype=torch.float64, generator=gen) for n in (4, lk, lk))
    k[0, 5, 0, 3] = float("nan")
    q.requires_grad_(), v.requires_grad_()
    out = ops.flash_attn(q, k, v)
    out.sum().backward()
    ref_q, ref_v = q.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    flash_attn_ref(ref_q, k, ref_v).sum().backward()
    for ours, ref in ((out, flash_attn_ref(q.detach(), k, v.detach())), (q.grad, ref_q.grad), (v.grad, ref_v.grad)):
        assert torch.equal(ours.isnan(), ref.isnan())
    assert v.grad[0, :, 0].isnan().all()  # head 0 read the NaN key: all of its dv is NaN, as in the reference


def test_fully_masked_rows_are_zero_with_zero_grads():
    q, k, v = _inputs(3, 9, 11, 4, 2, 32, dtype=torch.float32)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1] = False
    q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
    out = ops.flash_attn(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    out.sum().backward()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    assert torch.isfinite(q.grad).all()
    _, lse = ops._flash_attn_fwd(q.detach(), k.detach(), v.detach(), mask)
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()
    assert torch.isfinite(lse[0]).all()


def test_custom_scale_and_lse():
    q, k, v = _inputs(2, 13, 21, 4, 2, 64)
    scale = 0.37
    out, lse = ops._flash_attn_fwd(q, k, v, None, scale)
    ref, ref_lse = flash_attn_ref(q, k, v, None, scale, return_lse=True)
    assert rel_err(out, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    assert lse.dtype == torch.float64
    out32, lse32 = ops._flash_attn_fwd(q.float(), k.float(), v.float(), None, scale)
    assert lse32.dtype == torch.float32 and rel_err(lse32, ref_lse) < 1e-6


def test_empty_keys_give_zeros():
    q, k, v = _inputs(2, 5, 0, 2, 2, 32, dtype=torch.float32)
    out = ops.flash_attn(q, k, v)
    assert out.shape == q.shape and (out == 0).all()


def test_non_contiguous_inputs():
    q, k, v = _inputs(2, 19, 23, 4, 2, 64)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous strides
    kt = k[:, :, :, :].transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    out = ops.flash_attn(qt.float(), kt.float(), v.float())
    assert rel_err(out, flash_attn_ref(q, k, v)) < TOL[torch.float32]


def test_gradcheck_float64():
    q, k, v = _inputs(2, 3, 5, 2, 1, 4)
    mask = torch.tensor([[True, True, False, True, True], [False, False, False, False, False]])
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: ops.flash_attn(a, b, c, mask), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.flash_attn(a, b, c, None, 0.5), (q, k, v))


def test_double_backward_raises():
    """First-order gradients with create_graph=True are right; differentiating them again is an error naming the op
    (the backward ops have no derivative: torch warned and returned zero second derivatives)."""
    q, k, v = _inputs(2, 3, 5, 2, 1, 4)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    for t in (q, k, v):
        t.requires_grad_()
    ref = torch.autograd.grad(flash_attn_ref(q, k, v).square().sum(), (q, k, v))
    cases = [("flash_attn", lambda: ops.flash_attn(q, k, v)),
             ("flash_attn_varlen", lambda: ops.flash_attn_varlen(q.flatten(0, 1), k.flatten(0, 1)[:6],
                                                                 v.flatten(0, 1)[:6], cu, cu, 3, 3))]
    for name, fn in cases:
        grads = torch.autograd.grad(fn().square().sum(), (q, k, v), create_graph=True, allow_unused=True)
        if name == "flash_attn":
            for g, r in zip(grads, ref):
                assert rel_err(g.detach(), r) < 1e-10
        with pytest.raises(NotImplementedError, match=rf"nvembed::{name}: second derivatives are not implemented"):
            grads[0].square().sum().backward()


def test_empty_batch_backward_is_immediate():
    """No query rows: the gradients are zeros without one kernel task per (sequence, kv head) (a batch of 2^34
    empty sequences took minutes in the backward)."""
    q = torch.zeros(2 ** 34, 0, 2, 4, requires_grad=True)
    k = torch.zeros(2 ** 34, 0, 2, 4, requires_grad=True)
    v = torch.zeros(2 ** 34, 0, 2, 4, requires_grad=True)
    dq, dk, dv = torch.autograd.grad(ops.flash_attn(q, k, v).sum(), (q, k, v), allow_unused=True)
    assert all(g is None or g.shape == q.shape for g in (dq, dk, dv))
    dq, dk, dv = ops._flash_attn_bwd(torch.zeros(3, 0, 2, 4), torch.zeros(3, 0, 2, 4), torch.randn(3, 5, 2, 4),
                                     torch.randn(3, 5, 2, 4), torch.zeros(3, 0, 2, 4), torch.zeros(3, 2, 0), None, None)
    assert dq.shape == (3, 0, 2, 4) and (dk == 0).all() and (dv == 0).all() and dk.shape == (3, 5, 2, 4)


def _varlen_inputs(lens_q, lens_k, Hq, Hkv, D, dtype=torch.float64):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), Hq, D, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [([1, 17, 129, 5], [1, 17, 129, 5]), ([3, 70, 1], [600, 2, 9]),
                                  ([4, 0, 6], [5, 3, 0])], ids=["self", "cross", "empty"])
def test_varlen_matches_reference(dtype, lens):
    lens_q, lens_k = lens
    q64, k64, v64, cu_q, cu_k = _varlen_inputs(lens_q, lens_k, 4, 2, 64)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    out = ops.flash_attn_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    ref = flash_attn_varlen_ref(qr, kr, vr, cu_q, cu_k)
    assert_close(out, ref, dtype, "out")
    dout = torch.randn_like(ref)
    out.backward(dout.to(dtype))
    ref.backward(dout)
    for name, a, b in (("dq", q, qr), ("dk", k, kr), ("dv", v, vr)):
        assert_close(a.grad, b.grad, dtype, name)


def test_varlen_oversized_max_seqlen():
    """max_seqlen only has to bound the longest sequence: any larger value (up to INT64_MAX, which once
    overflowed the kernel's block count and returned uninitialized memory, or 2**45, which ran for minutes)
    gives the same result at once, forward and backward."""
    q64, k64, v64, cu_q, cu_k = _varlen_inputs([2, 3], [3, 3], 2, 2, 8)
    ref = flash_attn_varlen_ref(q64, k64, v64, cu_q, cu_k)
    for mq, mk in ((3, 3), (2 ** 31, 3), (3, 2 ** 45), (2 ** 63 - 1, 2 ** 63 - 1)):
        q = q64.clone().requires_grad_()
        out = ops.flash_attn_varlen(q, k64, v64, cu_q, cu_k, mq, mk)
        assert torch.allclose(out, ref, atol=1e-12), (mq, mk)
        out.sum().backward()
        assert torch.isfinite(q.grad).all()


def test_varlen_equals_padded_dense():
    lens = [5, 12, 1]
    q, k, v, cu, _ = _varlen_inputs(lens, lens, 4, 4, 32, dtype=torch.float32)
    out_v = ops.flash_attn_varlen(q, k, v, cu, cu, 12, 12)
    B, L = len(lens), max(lens)
    qd = torch.zeros(B, L, 4, 32)
    kd, vd = torch.zeros_like(qd), torch.zeros_like(qd)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lens):
        s = int(cu[i])
        qd[i, :n], kd[i, :n], vd[i, :n] = q[s:s + n], k[s:s + n], v[s:s + n]
        mask[i, :n] = True
    out_d = ops.flash_attn(qd, kd, vd, mask)
    for i, n in enumerate(lens):
        s = int(cu[i])
        assert rel_err(out_v[s:s + n], out_d[i, :n]) < 1e-6


def test_varlen_gradcheck_float64():
    q, k, v, cu_q, cu_k = _varlen_inputs([2, 3], [3, 1], 2, 1, 4)
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: ops.flash_attn_varlen(a, b, c, cu_q, cu_k, 3, 3), (q, k, v))


# ---- torch.library checks ---------------------------------------------------------------------------------------

def test_opcheck_flash_attn_fwd():
    q, k, v = _inputs(2, 7, 9, 4, 2, 32, dtype=torch.float32)
    mask = _random_mask(2, 9)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(ops._flash_attn_fwd, (q, k, v, mask, None))
    torch.library.opcheck(ops._flash_attn_fwd, (q, k, v, None, 0.2))
    out, lse = ops._flash_attn_fwd(q, k, v, mask, None)
    torch.library.opcheck(ops._flash_attn_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                out.detach(), lse.detach(), mask, None))
    # the public op is CompositeImplicitAutograd; opcheck exercises its decomposition
    torch.library.opcheck(ops.flash_attn, (q, k, v, mask, None))


def test_opcheck_varlen():
    q, k, v, cu_q, cu_k = _varlen_inputs([3, 5], [4, 2], 4, 2, 32, dtype=torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(ops._flash_attn_varlen_fwd, (q, k, v, cu_q, cu_k, 5, 4, None))
    torch.library.opcheck(ops.flash_attn_varlen, (q, k, v, cu_q, cu_k, 5, 4, None))


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self, d=64, hq=4, hkv=2):
            super().__init__()
            self.hq, self.hkv, self.hd = hq, hkv, d // hq
            self.q = torch.nn.Linear(d, d)
            self.kv = torch.nn.Linear(d, 2 * hkv * self.hd)
            self.o = torch.nn.Linear(d, d)

        def forward(self, x, mask):
            B, L, _ = x.shape
            q = self.q(x).view(B, L, self.hq, self.hd)
            k, v = self.kv(x).view(B, L, 2, self.hkv, self.hd).unbind(2)
            return self.o(ops.flash_attn(q, k, v, mask).reshape(B, L, -1))

    torch._dynamo.reset()
    model = Block()
    x = torch.randn(2, 11, 64)
    mask = _random_mask(2, 11, fully_masked_row=False)
    eager = model(x, mask)
    eager.sum().backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, mask)
    out.sum().backward()
    assert rel_err(out, eager) < 1e-6
    for p, g in zip(model.parameters(), g_eager):
        assert rel_err(p.grad, g) < 1e-5


def test_torch_compile_inductor():
    torch._dynamo.reset()
    q, k, v = _inputs(2, 9, 9, 4, 2, 32, dtype=torch.float32)
    f = torch.compile(lambda a, b, c: ops.flash_attn(a, b, c) * 2.0, fullgraph=True)
    assert rel_err(f(q, k, v), 2.0 * flash_attn_ref(q, k, v)) < 1e-5


# ---- bad input ---------------------------------------------------------------------------------------------------

_MODE = {"fake": False}


def _bad(match, *args, op=None):
    """The op (or, in fake mode, its fake kernel: what torch.compile traces) raises an error matching `match`."""
    if _MODE["fake"]:
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            with pytest.raises(ERR_TYPES, match=match):
                (op or ops.flash_attn)(*args)
        return
    with pytest.raises(ERR_TYPES, match=match):
        (op or ops.flash_attn)(*args)


@pytest.fixture(params=["eager", "fake"])
def check_mode(request, monkeypatch):
    monkeypatch.setitem(_MODE, "fake", request.param == "fake")
    return request.param


def test_bad_inputs(check_mode):
    """Every bad argument is an error naming the op and the argument, in eager mode and from the fake kernel (a
    compiled graph refuses it when traced, as eager does)."""
    q, k, v = _inputs(2, 5, 7, 4, 2, 32, dtype=torch.float32)
    _bad(r"nvembed::flash_attn: q must be 4-D", q[0], k, v)
    _bad(r"nvembed::flash_attn: k must be 4-D", q, k[0], v)
    _bad(r"nvembed::flash_attn: q has dtype Half", q.half(), k.half(), v.half())
    _bad(r"nvembed::flash_attn: q has dtype Int", q.int(), k.int(), v.int())
    _bad(r"nvembed::flash_attn: k has dtype Double but q has dtype Float", q, k.double(), v)
    _bad(r"nvembed::flash_attn: k.size\(0\)=1 \(batch\) is not q.size\(0\)=2", q, k[:1], v[:1])
    _bad(r"nvembed::flash_attn: k.size\(3\)=16 \(head dim\)", q, k[..., :16], v[..., :16])
    _bad(r"nvembed::flash_attn: k has shape .* but v has shape", q, k, v[:, :3])
    _bad(r"nvembed::flash_attn: q heads \(4\) must be a multiple of k/v heads \(3\)", q,
         torch.randn(2, 7, 3, 32), torch.randn(2, 7, 3, 32))
    _bad(r"nvembed::flash_attn: key_padding_mask must be bool", q, k, v, torch.ones(2, 7))
    _bad(r"nvembed::flash_attn: key_padding_mask must have shape \[B, Lk\]", q, k, v,
         torch.ones(2, 6, dtype=torch.bool))
    _bad(r"nvembed::flash_attn: scale must be finite", q, k, v, None, float("nan"))
    _bad(r"nvembed::flash_attn: scale must be finite", q, k, v, None, float("inf"))
    _bad(r"nvembed::flash_attn: scale must be finite and within float32's range", q, k, v, None, 1e300)
    _bad(r"nvembed::flash_attn: q has an empty batch", q[:0], k[:0], v[:0])
    if torch.cuda.is_available():
        _bad(r"nvembed::flash_attn: k is on", q, k.cuda(), v)


def test_bad_varlen_inputs():
    q, k, v, cu_q, cu_k = _varlen_inputs([3, 5], [4, 2], 4, 2, 32, dtype=torch.float32)
    f = ops.flash_attn_varlen
    _bad(r"nvembed::flash_attn_varlen: q must be 3-D", q[None], k, v, cu_q, cu_k, 5, 4, op=f)
    for mode in ("eager", "fake"):  # the checks of q / k / v the fake kernel repeats
        _MODE["fake"] = mode == "fake"
        try:
            _bad(r"nvembed::flash_attn_varlen: k has dtype Double but q has dtype Float", q, k.double(), v, cu_q, cu_k,
                 5, 4, op=f)
            _bad(r"nvembed::flash_attn_varlen: q heads \(4\) must be a multiple of k/v heads \(3\)", q,
                 torch.randn(6, 3, 32), torch.randn(6, 3, 32), cu_q, cu_k, 5, 4, op=f)
            _bad(r"nvembed::flash_attn_varlen: scale must be finite", q, k, v, cu_q, cu_k, 5, 4, float("inf"), op=f)
        finally:
            _MODE["fake"] = False
    _bad(r"nvembed::flash_attn_varlen: cu_seqlens_q must be int32", q, k, v, cu_q.long(), cu_k, 5, 4, op=f)
    _bad(r"nvembed::flash_attn_varlen: cu_seqlens_q\[-1\]=8 must equal the packed length 7", q[:7], k, v, cu_q,
         cu_k, 5, 4, op=f)
    _bad(r"nvembed::flash_attn_varlen: cu_seqlens_k must be non-decreasing", q, k, v, cu_q,
         torch.tensor([0, 6, 5], dtype=torch.int32), 5, 6, op=f)
    _bad(r"nvembed::flash_attn_varlen: max_seqlen_q=4 is smaller than the longest sequence \(5\)", q, k, v, cu_q,
         cu_k, 4, 4, op=f)
    _bad(r"nvembed::flash_attn_varlen: cu_seqlens_q has 2 sequences but cu_seqlens_k has 1", q, k[:6], v[:6],
         cu_q, torch.tensor([0, 6], dtype=torch.int32), 5, 6, op=f)
    _bad(r"nvembed::flash_attn_varlen: cu_seqlens_q\[0\] must be 0", q, k, v,
         torch.tensor([1, 3, 8], dtype=torch.int32), cu_k, 5, 4, op=f)


# ---- CUDA (run by bench/gpu_check.sh on a GPU machine; skipped here) --------------------------------------------

@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attn_cuda_matches_reference(dtype):
    if not nvembed_ext.build_info()["with_cuda"]:
        pytest.skip("built without CUDA")
    q, k, v = _inputs(2, 129, 333, 8, 2, 128)
    mask = _random_mask(2, 333)
    try:
        _check_against_ref(q, k, v, mask, dtype, device="cuda")
    except NotImplementedError as e:  # the CUDA attention kernels land with the CUDA attention issue
        pytest.skip(str(e))
