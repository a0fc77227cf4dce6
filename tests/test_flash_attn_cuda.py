"""nvembed::flash_attn and nvembed::flash_attn_varlen on CUDA (bf16 / fp16, head dims 32 / 64 / 128): outputs, lse
and gradients against the float64 reference on awkward shapes (L = 1, odd lengths, several tiles, Lq != Lk, GQA,
MQA, ragged key padding with a fully masked batch row, varlen with empty sequences), against the CPU op, plus
full-write (NaN-poisoned allocator), determinism, custom / negative scale, strided and misaligned inputs, opcheck,
torch.compile and argument errors.

The reference, masking, varlen, determinism and layout tests run once per CUDA kernel set (the `flash_kernel`
fixture sets NVEMBED_FLASH_KERNEL, which picks the forward and the backward kernels): "sm80" (mma.sync, every
device) and "sm90" (TMA + wgmma, head dims 64 / 128, run only on a compute capability 9.0 device with a build that
has sm_90a code).

Every test needs a CUDA device of sm_80 or newer and a build whose flash-attention ops have CUDA kernels (marked
`cuda`; skipped elsewhere, so this file is inert on CPU-only machines and on builds without the CUDA kernels).

Tolerances. The reference runs in float64 on the very same (already rounded) bf16 / fp16 inputs, so the error
measured is the kernels' own: S = q k^T accumulated in fp32, P rounded to the input dtype before P V (as every
flash-attention kernel does), the output rounded once. That gives about 2^-9 (bf16) / 2^-11 (fp16) relative error
per element; the bounds below are max |got - ref| / max(|ref|, 1e-2) — "relative to the output scale" — at roughly
5x to 10x that, which keeps them free of flakes while any indexing, masking or rescaling bug (errors of O(1)) fails
by orders of magnitude. Gradients go through one more rounded product (dS in the input dtype before dS K and
dS^T Q, and the sum over the query heads of a GQA group), so their bounds are twice the forward's. The floor 1e-2
of the scale matters only where the exact gradient is 0 (Lk = 1: dS = dP - rowsum(dO * O) = 0), where fp32 noise
of ~1e-6 must not count. lse is fp32 from exact bf16 products: |error| <= 1e-3 + 1e-4 |lse|.
"""
import math

import pytest
import torch

import nvembed_ext  # registers torch.ops.nvembed.*
from nvembed_ext.reference import flash_attn_ref
from conftest import ERR_TYPES, rel_err, requires_cuda

ops = torch.ops.nvembed

FLASH_OPS = ("_flash_attn_fwd", "_flash_attn_bwd", "_flash_attn_varlen_fwd", "_flash_attn_varlen_bwd")


def _flash_attn_has_cuda_kernels() -> bool:
    """Whether this build registered CUDA kernels for the flash-attention ops (the way nvembed.device decides
    whether "auto" may pick CUDA)."""
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"nvembed::{op}", "CUDA") for op in FLASH_OPS)
    except RuntimeError:
        return False


def _sm80_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


pytestmark = [
    pytest.mark.cuda,
    requires_cuda,
    pytest.mark.skipif(not _flash_attn_has_cuda_kernels(), reason="this build has no CUDA kernels for flash_attn"),
    pytest.mark.skipif(not _sm80_or_newer(), reason="the flash-attention kernels need sm_80 or newer"),
]

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
HEAD_DIMS = [32, 64, 128]
# max |got - ref| / max(|ref|, SCALE_FLOOR) (see the module docstring)
FWD_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
BWD_TOL = {torch.bfloat16: 4e-2, torch.float16: 8e-3}
SCALE_FLOOR = 1e-2

# B, Lq, Lk, Hq, Hkv: L = 1; odd lengths inside one tile; Lq != Lk across tile edges (GQA 8/2); MQA; lengths of
# several tiles on both sides.
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 17, 17, 4, 4),
    (2, 77, 129, 8, 2),
    (3, 129, 77, 4, 1),
    (2, 300, 1000, 8, 2),
    (1, 1000, 300, 2, 2),
]


# ---- helpers -----------------------------------------------------------------------------------------------------

@pytest.fixture(params=["sm80", "sm90"])
def flash_kernel(request, monkeypatch):
    """The kernel set under test (NVEMBED_FLASH_KERNEL, read by the op on every forward and backward call). The
    sm90 run is skipped where the dispatcher would not pick the Hopper kernels (device not 9.0, build without
    sm_90a); tests with head dim 32 skip it through _uses (no Hopper instantiation)."""
    monkeypatch.setenv("NVEMBED_FLASH_KERNEL", request.param)
    if request.param == "sm90":
        major, minor = torch.cuda.get_device_capability()
        if nvembed_ext._C.flash_kernel_for(major, minor, 128) != "sm90":
            pytest.skip(f"the Hopper kernels do not run here (compute capability {major}.{minor}, build archs "
                        f"{nvembed_ext.build_info()['cuda_archs']!r})")
    return request.param


def _uses(flash_kernel, D):
    """Skip a head dim the kernel under test does not take (the sm80 kernel would run, already tested)."""
    major, minor = torch.cuda.get_device_capability()
    if nvembed_ext._C.flash_kernel_for(major, minor, D) != flash_kernel:
        pytest.skip(f"head dim {D} does not run on the {flash_kernel} kernels")


def _qkv(B, Lq, Lk, Hq, Hkv, D, dtype):
    q = torch.randn(B, Lq, Hq, D, device=DEV).to(dtype)
    k = torch.randn(B, Lk, Hkv, D, device=DEV).to(dtype)
    v = torch.randn(B, Lk, Hkv, D, device=DEV).to(dtype)
    return q, k, v


def _ragged_mask(B, Lk, fully_masked_row=True):
    """Prefix key padding (True = attend) with random lengths in [1, Lk]; the last batch row has no key at all when
    B > 1 (its output must be 0)."""
    lengths = torch.randint(1, Lk + 1, (B,))
    lengths[0] = Lk
    if fully_masked_row and B > 1:
        lengths[-1] = 0
    return (torch.arange(Lk)[None, :] < lengths[:, None]).to(DEV)


def _check(name, got, ref, tol):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    got, ref = got.detach().double(), ref.detach().double()
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, SCALE_FLOOR)
    assert err <= tol * scale, (f"{name}: max |err| {err:.3e} > {tol:.0e} x {scale:.3e} "
                                f"(relative Frobenius error {rel_err(got, ref):.3e})")


def _check_lse(lse, ref_lse):
    lse, ref_lse = lse.detach(), ref_lse.detach()
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, (lse.dtype, lse.shape, ref_lse.shape)
    assert not torch.isnan(lse).any(), "lse has NaN"
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), dead), "lse is +inf exactly where the row has no key"
    assert (lse[dead] > 0).all(), "a row without keys has lse = +inf, not -inf"
    torch.testing.assert_close(lse[~dead].double(), ref_lse[~dead].double(), rtol=1e-4, atol=1e-3)


def _ref(q, k, v, mask, scale, dout=None):
    """float64 reference on the same rounded inputs: out, lse and (with dout) dq, dk, dv."""
    q64, k64, v64 = (t.detach().double().requires_grad_(dout is not None) for t in (q, k, v))
    out, lse = flash_attn_ref(q64, k64, v64, mask, scale, return_lse=True)
    if dout is None:
        return out, lse, None
    grads = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return out.detach(), lse.detach(), grads


def _fwd_bwd(q, k, v, mask, scale, dout):
    """The public op forward + backward: out, (dq, dk, dv). detach() keeps the inputs' strides and storage
    offsets (no copy), so strided and misaligned inputs reach the op as they are."""
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = ops.flash_attn(qg, kg, vg, mask, scale)
    grads = torch.autograd.grad(out, (qg, kg, vg), dout)
    return out.detach(), grads


def _check_all(q, k, v, mask=None, scale=None):
    dtype = q.dtype
    out, lse = ops._flash_attn_fwd(q, k, v, mask, scale)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device and out.is_contiguous()
    dout = torch.randn_like(out)
    ref_out, ref_lse, ref_grads = _ref(q, k, v, mask, scale, dout)
    _check("out", out, ref_out, FWD_TOL[dtype])
    _check_lse(lse, ref_lse)
    out2, grads = _fwd_bwd(q, k, v, mask, scale, dout)
    assert torch.equal(out2, out), "flash_attn and _flash_attn_fwd give the same output"
    for name, g, t, r in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_grads):
        assert g.dtype == dtype and g.shape == t.shape and g.device == t.device, name
        _check(name, g, r, BWD_TOL[dtype])
    return out, lse, grads


def _poison_allocator():
    """Fill freed blocks of both caching-allocator pools (large blocks > 1 MB, small ones) with NaN: an output
    element a kernel never writes (or reads before writing) then stays or becomes NaN."""
    big = torch.full((1 << 24,), float("nan"), device=DEV)
    small = [torch.full((1 << 17,), float("nan"), device=DEV) for _ in range(64)]
    del big, small


# ---- against the float64 reference -------------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "ragged"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(dtype, D, shape, masked, flash_kernel):
    _uses(flash_kernel, D)
    B, Lq, Lk, Hq, Hkv = shape
    q, k, v = _qkv(B, Lq, Lk, Hq, Hkv, D, dtype)
    mask = _ragged_mask(B, Lk) if masked else None
    _check_all(q, k, v, mask)


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scattered_mask(dtype, D, flash_kernel):
    _uses(flash_kernel, D)
    """A non-prefix mask (every third key off, random holes) over several key tiles, GQA."""
    B, Lq, Lk, Hq, Hkv = 2, 70, 333, 8, 2
    q, k, v = _qkv(B, Lq, Lk, Hq, Hkv, D, dtype)
    mask = torch.rand(B, Lk, device=DEV) > 0.3
    mask[:, ::3] = False
    mask[:, 1] = True
    _check_all(q, k, v, mask)


@pytest.mark.parametrize("scale", [0.37, -0.5, 1.0, 1e-3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_custom_scale(dtype, scale, flash_kernel):
    """scale multiplies q k^T (1.0: no 1/sqrt(D); negative: the softmax prefers the least similar keys; tiny: near
    uniform attention)."""
    q, k, v = _qkv(2, 45, 200, 4, 2, 64, dtype)
    _check_all(q, k, v, _ragged_mask(2, 200), scale)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _qkv(2, 33, 65, 4, 2, 128, torch.bfloat16)
    assert torch.equal(ops.flash_attn(q, k, v), ops.flash_attn(q, k, v, None, 1.0 / math.sqrt(128)))


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fully_masked_rows_zero_and_everything_written(dtype, D, flash_kernel):
    """Batch row 1 has no key: its output and its dq / dk / dv are exactly 0 and its lse is +inf; masked keys of
    the other rows get exactly zero dk / dv (P = 0 there); no NaN / inf anywhere — with the allocator's free
    blocks NaN-poisoned before the forward and before the backward, so an element the kernels skip shows up."""
    _uses(flash_kernel, D)
    B, Lq, Lk, Hq, Hkv = 3, 300, 200, 8, 2  # > 1 MB outputs (large pool) and > 1 tile on both sides
    q, k, v = _qkv(B, Lq, Lk, Hq, Hkv, D, dtype)
    mask = _ragged_mask(B, Lk, fully_masked_row=False)
    mask[1] = False
    mask[2, 150:] = False
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    _poison_allocator()
    out, lse = ops._flash_attn_fwd(qg, kg, vg, mask, None)
    dout = torch.randn_like(out)
    _poison_allocator()
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), dout)
    torch.cuda.synchronize()
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} has NaN / inf"
    assert not torch.isnan(lse).any()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all() and torch.isfinite(lse[[0, 2]]).all()
    off = ~mask
    assert (dk[off] == 0).all() and (dv[off] == 0).all(), "masked keys get exactly zero dk / dv"
    ref_out, ref_lse, ref_grads = _ref(q, k, v, mask, None, dout)
    _check("out", out, ref_out, FWD_TOL[dtype])
    _check_lse(lse, ref_lse)
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        _check(name, g, r, BWD_TOL[dtype])


# ---- against the CPU op ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_cpu_op(dtype, D):
    """The same rounded inputs upcast to float32 through the CPU kernels: same semantics (GQA, ragged mask, a row
    without keys), outputs, lse and gradients within the low-precision bounds."""
    B, Lq, Lk, Hq, Hkv = 3, 129, 77, 8, 2
    q, k, v = _qkv(B, Lq, Lk, Hq, Hkv, D, dtype)
    mask = _ragged_mask(B, Lk)
    out, lse = ops._flash_attn_fwd(q, k, v, mask, None)
    dout = torch.randn_like(out)
    _, grads = _fwd_bwd(q, k, v, mask, None, dout)
    qc, kc, vc = (t.detach().float().cpu().requires_grad_() for t in (q, k, v))
    out_cpu, lse_cpu = ops._flash_attn_fwd(qc, kc, vc, mask.cpu(), None)
    grads_cpu = torch.autograd.grad(out_cpu, (qc, kc, vc), dout.float().cpu())
    _check("out vs cpu", out.cpu(), out_cpu, FWD_TOL[dtype])
    _check_lse(lse.cpu(), lse_cpu.detach())
    for name, g, r in zip(("dq", "dk", "dv"), grads, grads_cpu):
        _check(f"{name} vs cpu", g.cpu(), r, BWD_TOL[dtype])


# ---- varlen ------------------------------------------------------------------------------------------------------

def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


def _varlen_ref(q, k, v, lens_q, lens_k, scale, dout):
    """float64 reference per sequence: out [Tq, Hq, D], lse [Hq, Tq], dq, dk, dv. A sequence without keys gives 0
    (lse +inf); keys of a sequence without queries get zero gradients."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    Hq, D = q.shape[1], q.shape[2]
    outs, lses = [], []
    qs = ks = 0
    for lq, lk in zip(lens_q, lens_k):
        if lq == 0 or lk == 0:  # nothing to attend to (the reference cannot reduce over zero keys)
            outs.append(q64.new_zeros(lq, Hq, D))
            lses.append(q64.new_full((Hq, lq), float("inf")))
        else:
            o, l = flash_attn_ref(q64[None, qs:qs + lq], k64[None, ks:ks + lk], v64[None, ks:ks + lk], None, scale,
                                  return_lse=True)
            outs.append(o[0])
            lses.append(l[0])
        qs, ks = qs + lq, ks + lk
    out = torch.cat(outs)
    lse = torch.cat(lses, dim=1)
    grads = torch.autograd.grad(out, (q64, k64, v64), dout.double(), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q64, k64, v64))]
    return out.detach(), lse.detach(), grads


# (lens_q, lens_k): self-attention with an empty sequence and sequences of several tiles; cross-attention where one
# sequence has queries but no keys (output 0) and another keys but no queries (zero dk / dv).
VARLEN_LENS = {
    "self": ([5, 0, 129, 1, 300, 77], [5, 0, 129, 1, 300, 77]),
    "cross": ([3, 70, 0, 17, 256], [600, 0, 9, 130, 1]),
}


@pytest.mark.parametrize("case", list(VARLEN_LENS))
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_matches_reference(dtype, D, case, flash_kernel):
    _uses(flash_kernel, D)
    lens_q, lens_k = VARLEN_LENS[case]
    Hq, Hkv = 8, 2
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = torch.randn(sum(lens_q), Hq, D, device=DEV).to(dtype)
    k = torch.randn(sum(lens_k), Hkv, D, device=DEV).to(dtype)
    v = torch.randn(sum(lens_k), Hkv, D, device=DEV).to(dtype)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    _poison_allocator()
    out, lse = ops._flash_attn_varlen_fwd(qg, kg, vg, cu_q, cu_k, max(lens_q), max(lens_k), None)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (Hq, sum(lens_q))
    dout = torch.randn_like(out)
    _poison_allocator()
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), dout)
    ref_out, ref_lse, ref_grads = _varlen_ref(q, k, v, lens_q, lens_k, None, dout)
    _check("out", out, ref_out, FWD_TOL[dtype])
    _check_lse(lse, ref_lse)
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        _check(name, g, r, BWD_TOL[dtype])
    # exact zeros: queries without keys, keys without queries
    qs = ks = 0
    for lq, lk in zip(lens_q, lens_k):
        if lk == 0:
            assert (out[qs:qs + lq] == 0).all() and (dq[qs:qs + lq] == 0).all()
        if lq == 0:
            assert (dk[ks:ks + lk] == 0).all() and (dv[ks:ks + lk] == 0).all()
        qs, ks = qs + lq, ks + lk
    public = ops.flash_attn_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    assert torch.equal(public, out.detach())


def test_varlen_equals_padded_dense(flash_kernel):
    """The same sequences packed (varlen) and padded with a key mask give the same valid rows."""
    lens = [33, 1, 200, 70]
    Hq, Hkv, D = 4, 2, 64
    cu = _cu(lens)
    q = torch.randn(sum(lens), Hq, D, device=DEV).bfloat16()
    k = torch.randn(sum(lens), Hkv, D, device=DEV).bfloat16()
    v = torch.randn(sum(lens), Hkv, D, device=DEV).bfloat16()
    out_v = ops.flash_attn_varlen(q, k, v, cu, cu, max(lens), max(lens))
    B, L = len(lens), max(lens)
    qd = q.new_zeros(B, L, Hq, D)
    kd, vd = q.new_zeros(B, L, Hkv, D), q.new_zeros(B, L, Hkv, D)
    mask = torch.zeros(B, L, dtype=torch.bool, device=DEV)
    for i, n in enumerate(lens):
        s = int(cu[i])
        qd[i, :n], kd[i, :n], vd[i, :n] = q[s:s + n], k[s:s + n], v[s:s + n]
        mask[i, :n] = True
    out_d = ops.flash_attn(qd, kd, vd, mask)
    for i, n in enumerate(lens):
        s = int(cu[i])
        _check(f"sequence {i}", out_v[s:s + n], out_d[i, :n], FWD_TOL[torch.bfloat16])


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_long_sequences(dtype, D, flash_kernel):
    """Thousands of keys and queries: the Hopper kernels' stage rings wrap many times (33 key blocks of the forward
    with a partial one, 65 of dQ; 5 query blocks x 3 query heads per kv head in dK / dV), forward and backward
    against the float64 reference, lse included."""
    q, k, v = _qkv(1, 300, 4100, 6, 2, D, dtype)
    _check_all(q, k, v)


# ---- determinism, layouts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_deterministic(dtype, D, flash_kernel):
    """No atomics: the same inputs give the same bits, forward and backward (GQA, so dk / dv sum over 4 query
    heads; several key and query tiles; a ragged mask)."""
    q, k, v = _qkv(2, 300, 1000, 8, 2, D, dtype)
    mask = _ragged_mask(2, 1000, fully_masked_row=False)
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = ops._flash_attn_fwd(qg, kg, vg, mask, None)
        runs.append((out.detach(), lse, *torch.autograd.grad(out, (qg, kg, vg), dout)))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_varlen_deterministic(flash_kernel):
    lens = [300, 0, 129, 1000]
    cu = _cu(lens)
    q = torch.randn(sum(lens), 8, 128, device=DEV).bfloat16()
    k = torch.randn(sum(lens), 2, 128, device=DEV).bfloat16()
    v = torch.randn(sum(lens), 2, 128, device=DEV).bfloat16()
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = ops.flash_attn_varlen(qg, kg, vg, cu, cu, 1000, 1000)
        runs.append((out.detach(), *torch.autograd.grad(out, (qg, kg, vg), dout)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_inputs(dtype, flash_kernel):
    """q from a transpose of [B, H, L, D] (what an attention module holds), k / v unbound from one packed kv
    projection [B, L, 2, Hkv, D]: the same output and gradients as contiguous copies."""
    B, L, Hq, Hkv, D = 2, 77, 8, 2, 64
    q = torch.randn(B, Hq, L, D, device=DEV).to(dtype).transpose(1, 2)
    k, v = torch.randn(B, L, 2, Hkv, D, device=DEV).to(dtype).unbind(2)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    mask = _ragged_mask(B, L)
    dout = torch.randn(B, L, Hq, D, device=DEV).to(dtype)
    out, grads = _fwd_bwd(q, k, v, mask, None, dout)
    out_c, grads_c = _fwd_bwd(q.contiguous(), k.contiguous(), v.contiguous(), mask, None, dout)
    assert torch.equal(out, out_c)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_c):
        assert a.shape == b.shape and torch.equal(a, b), name
    # a non-contiguous dout (the gradient of a transposed use of the output)
    dout_t = dout.transpose(1, 2).contiguous().transpose(1, 2)
    _, grads_t = _fwd_bwd(q, k, v, mask, None, dout_t)
    for name, a, b in zip(("dq", "dk", "dv"), grads_t, grads_c):
        assert torch.equal(a, b), f"{name} with a non-contiguous dout"


def test_misaligned_inputs(flash_kernel):
    """Contiguous tensors whose data starts 2 bytes into their storage (not 16-byte aligned, so no vector loads
    straight from them): the same result as aligned copies."""
    B, L, H, D = 2, 70, 4, 64
    n = B * L * H * D
    flat = torch.randn(3 * n + 1, device=DEV).bfloat16()
    q, k, v = (flat[1 + i * n:1 + (i + 1) * n].view(B, L, H, D) for i in range(3))
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    mask = _ragged_mask(B, L)
    dout = torch.randn(B, L, H, D, device=DEV).bfloat16()
    out, grads = _fwd_bwd(q, k, v, mask, None, dout)
    out_a, grads_a = _fwd_bwd(q.clone(), k.clone(), v.clone(), mask, None, dout)
    assert torch.equal(out, out_a)
    for a, b in zip(grads, grads_a):
        assert torch.equal(a, b)


# ---- torch.library / torch.compile -------------------------------------------------------------------------------

def test_opcheck_flash_attn():
    q, k, v = _qkv(2, 7, 9, 4, 2, 32, torch.bfloat16)
    mask = _ragged_mask(2, 9)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(ops._flash_attn_fwd, (q, k, v, mask, None))
    torch.library.opcheck(ops._flash_attn_fwd, (q, k, v, None, 0.2))
    out, lse = ops._flash_attn_fwd(q, k, v, mask, None)
    torch.library.opcheck(ops._flash_attn_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                out.detach(), lse.detach(), mask, None))
    torch.library.opcheck(ops.flash_attn, (q, k, v, mask, None))


def test_opcheck_flash_attn_varlen():
    lens_q, lens_k = [3, 0, 5], [4, 2, 0]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = torch.randn(sum(lens_q), 4, 64, device=DEV).half().requires_grad_()
    k = torch.randn(sum(lens_k), 2, 64, device=DEV).half().requires_grad_()
    v = torch.randn(sum(lens_k), 2, 64, device=DEV).half().requires_grad_()
    torch.library.opcheck(ops._flash_attn_varlen_fwd, (q, k, v, cu_q, cu_k, 5, 4, None))
    out, lse = ops._flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, 5, 4, None)
    torch.library.opcheck(ops._flash_attn_varlen_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                       out.detach(), lse.detach(), cu_q, cu_k, 5, 4, None))
    torch.library.opcheck(ops.flash_attn_varlen, (q, k, v, cu_q, cu_k, 5, 4, None))


def test_torch_compile_fullgraph_with_backward():
    """A function around the op (projection in, op with GQA and a mask, reduction out) compiled with inductor,
    fullgraph: output and input gradients equal eager's within bf16 rounding of the surrounding ops."""
    torch._dynamo.reset()
    B, L, Hq, Hkv, D = 2, 37, 4, 2, 64
    w = torch.randn(D, D, device=DEV).bfloat16() / 8

    def f(q, k, v, mask):
        return (ops.flash_attn(q @ w, k, v, mask).float() ** 2).sum()

    q, k, v = _qkv(B, L, L, Hq, Hkv, D, torch.bfloat16)
    mask = _ragged_mask(B, L)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = f(*leaves, mask)
    g_eager = torch.autograd.grad(eager, leaves)
    leaves_c = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled = torch.compile(f, fullgraph=True)(*leaves_c, mask)
    g_comp = torch.autograd.grad(compiled, leaves_c)
    assert rel_err(compiled, eager) < 1e-2
    for name, a, b in zip(("dq", "dk", "dv"), g_comp, g_eager):
        assert torch.isfinite(a).all() and rel_err(a, b) < 2e-2, name


# ---- argument errors ---------------------------------------------------------------------------------------------

def _raises(exc, substrings, fn, *args):
    with pytest.raises(exc) as info:
        fn(*args)
    msg = str(info.value)
    for s in substrings:
        assert s in msg, f"{s!r} not in the error message {msg!r}"


@pytest.mark.parametrize("dtype,name", [(torch.float32, "Float"), (torch.float64, "Double")])
def test_unsupported_dtype(dtype, name):
    """The CUDA kernels take bf16 and fp16 only (float32 / float64 work on the CPU op)."""
    q, k, v = (t.to(dtype) for t in _qkv(2, 5, 7, 4, 2, 64, torch.bfloat16))
    _raises(TypeError, ["nvembed::flash_attn", f"q has dtype {name}"], ops.flash_attn, q, k, v)
    cu = _cu([5, 5])
    qv, kv, vv = (torch.randn(10, h, 64, device=DEV, dtype=dtype) for h in (4, 2, 2))
    _raises(TypeError, ["nvembed::flash_attn_varlen", f"q has dtype {name}"], ops.flash_attn_varlen, qv, kv, vv,
            cu, cu, 5, 5)


def test_unsupported_head_dim():
    q, k, v = _qkv(2, 5, 7, 4, 2, 80, torch.bfloat16)
    _raises(ValueError, ["nvembed::flash_attn", "head dim 80"], ops.flash_attn, q, k, v)
    cu = _cu([5, 5])
    qv, kv, vv = (torch.randn(10, h, 80, device=DEV).bfloat16() for h in (4, 2, 2))
    _raises(ValueError, ["nvembed::flash_attn_varlen", "head dim 80"], ops.flash_attn_varlen, qv, kv, vv, cu, cu,
            5, 5)


def test_mixed_devices():
    q, k, v = _qkv(2, 5, 7, 4, 2, 64, torch.bfloat16)
    with pytest.raises(ERR_TYPES, match=r"nvembed::flash_attn: .*\bk\b"):
        ops.flash_attn(q, k.cpu(), v)
    cu = _cu([5, 5])
    qv, kv, vv = (torch.randn(10, h, 64, device=DEV).bfloat16() for h in (4, 2, 2))
    with pytest.raises(ERR_TYPES, match=r"nvembed::flash_attn_varlen: .*\bk\b"):
        ops.flash_attn_varlen(qv, kv.cpu(), vv, cu, cu, 5, 5)
