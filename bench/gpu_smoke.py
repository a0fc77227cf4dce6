"""First look at the CUDA kernels on a GPU, in seconds: every kernel family (flash forward / backward on the sm80
and the Hopper kernels, dense / GQA / masked / varlen; InfoNCE tensor-core path with the sm80 and the Hopper
forward and the plain path; latent_pool) on a few awkward shapes, fresh random inputs, against the float64
references in nvembed_ext.reference. One line per case with ||ours - ref|| / ||ref|| of the output and of each
gradient, and whether every value is finite; 'hang?' lines show which case was running if the step is killed.
bench/gpu_check.sh runs it first, so a short device call still says which kernels work. Exit status 1 on any
failed case.

    python bench/gpu_smoke.py
"""
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

import nvembed_ext  # noqa: E402
from nvembed_ext import reference as ref  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_vars  # noqa: E402

ops = torch.ops.nvembed
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: checks this script itself
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
failures = []


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    n = b.norm().item()
    return (a - b).norm().item() / (n if n > 0 else 1.0)


def report(name, dtype, errs, t0):
    worst = max(errs.values())
    ok = worst == worst and worst <= TOL[dtype]
    if not ok:
        failures.append(name)
    cols = " ".join(f"{k}={v:.2e}" for k, v in errs.items())
    print(f"{'ok  ' if ok else 'FAIL'} {name:<58} {cols}  ({time.perf_counter() - t0:.2f}s)", flush=True)


def run_case(name, dtype, fn):
    print(f"hang? {name}", flush=True)
    t0 = time.perf_counter()
    try:
        errs = fn()
        if DEV == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # report and go on: one broken kernel must not hide the others
        failures.append(name)
        print(f"FAIL {name:<58} raised {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        return
    report(name, dtype, errs, t0)


def grads_vs_ref(outs, refs, inputs, ref_inputs, names):
    g = torch.randn_like(outs)
    got = torch.autograd.grad(outs, inputs, g)
    want = torch.autograd.grad(refs, ref_inputs, g.double().to(refs.device))
    errs = {"out": rel(outs, refs)}
    for n, a, b in zip(names, got, want):
        errs["d" + n] = rel(a, b)
    return errs


def leaf(t):
    return t.detach().clone().requires_grad_()


def flash_dense(dtype, B, L, Hq, Hkv, D, lengths=None):
    def fn():
        q = torch.randn(B, L, Hq, D, device=DEV, dtype=dtype, requires_grad=True)
        k = torch.randn(B, L, Hkv, D, device=DEV, dtype=dtype, requires_grad=True)
        v = torch.randn(B, L, Hkv, D, device=DEV, dtype=dtype, requires_grad=True)
        mask = None
        if lengths is not None:
            mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).to(DEV)
        out = ops.flash_attn(q, k, v, mask)
        rq, rk, rv = (leaf(t.detach().double()) for t in (q, k, v))
        r = ref.flash_attn_ref(rq, rk, rv, mask)
        return grads_vs_ref(out, r, (q, k, v), (rq, rk, rv), "qkv")
    return fn


def flash_varlen(dtype, lens_q, lens_k, Hq, Hkv, D):
    def fn():
        cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        q = torch.randn(sum(lens_q), Hq, D, device=DEV, dtype=dtype, requires_grad=True)
        k = torch.randn(sum(lens_k), Hkv, D, device=DEV, dtype=dtype, requires_grad=True)
        v = torch.randn(sum(lens_k), Hkv, D, device=DEV, dtype=dtype, requires_grad=True)
        out = ops.flash_attn_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
        rq, rk, rv = (leaf(t.detach().double()) for t in (q, k, v))
        r = ref.flash_attn_varlen_ref(rq, rk, rv, cu_q, cu_k)
        return grads_vs_ref(out, r, (q, k, v), (rq, rk, rv), "qkv")
    return fn


def infonce(dtype, B, G, d, extra, inb, temp=0.05):
    def fn():
        q = (torch.randn(B, d, device=DEV, dtype=dtype) / d ** 0.5).requires_grad_()
        docs = (torch.randn(B * G + extra, d, device=DEV, dtype=dtype) / d ** 0.5).requires_grad_()
        loss = ops.infonce(q, docs, G, temp, inb)
        rq, rd = leaf(q.detach().double()), leaf(docs.detach().double())
        r = ref.infonce_ref(rq, rd, G, temp, inb)
        got = torch.autograd.grad(loss, (q, docs))
        want = torch.autograd.grad(r, (rq, rd))
        return {"loss": rel(loss, r), "dq": rel(got[0], want[0]), "ddocs": rel(got[1], want[1])}
    return fn


def latent_pool(dtype, B, L, d, N, H, ff):
    def fn():
        def p(*shape, scale=1.0):
            return (torch.randn(*shape, device=DEV, dtype=dtype) * scale).requires_grad_()
        x = p(B, L, d)
        mask = (torch.rand(B, L, device=DEV) < 0.7).to(torch.int64)
        mask[0] = 0  # a row with nothing to pool: 0, not NaN
        inner = H * 16
        args = [x, mask, p(N, d), 1 + p(d, scale=0.1), p(d, scale=0.1), 1 + p(d, scale=0.1), p(d, scale=0.1),
                p(inner, d, scale=d ** -0.5), p(2 * inner, d, scale=d ** -0.5), p(d, inner, scale=inner ** -0.5),
                1 + p(d, scale=0.1), p(d, scale=0.1), p(2 * ff, d, scale=d ** -0.5), p(2 * ff, scale=0.1),
                p(d, ff, scale=ff ** -0.5), p(d, scale=0.1)]
        args = [a.detach().requires_grad_() if a.dtype.is_floating_point else a for a in args]
        out = ops.latent_pool(*args, H, False)
        rargs = [leaf(a.detach().double()) if a.dtype.is_floating_point else a for a in args]
        r = ref.latent_pool_ref(*rargs, H, False)
        flt = [i for i, a in enumerate(args) if a.dtype.is_floating_point]
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [args[i] for i in flt], g)
        want = torch.autograd.grad(r, [rargs[i] for i in flt], g.double())
        errs = {"out": rel(out, r)}
        errs["grads(max)"] = max(rel(a, b) for a, b in zip(got, want))
        return errs
    return fn


def main():
    torch.manual_seed(int(time.time()))
    print(torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch", torch.__version__,
          nvembed_ext.build_info(), flush=True)
    # NVEMBED_*_KERNEL=sm90 runs the Hopper kernel where it applies and the sm80 one elsewhere
    for kern in ("sm80", "sm90"):
        os.environ["NVEMBED_FLASH_KERNEL"] = kern
        for dtype in (torch.bfloat16, torch.float16):
            for D in (64, 128):
                run_case(f"flash {kern} {str(dtype)[6:]} D={D} B=2 L=1", dtype, flash_dense(dtype, 2, 1, 4, 4, D))
                run_case(f"flash {kern} {str(dtype)[6:]} D={D} GQA 8/2 L=197 masked", dtype,
                         flash_dense(dtype, 3, 197, 8, 2, D, lengths=[197, 61, 0]))
            run_case(f"flash {kern} {str(dtype)[6:]} D=128 B=1 L=1000 H=4", dtype,
                     flash_dense(dtype, 1, 1000, 4, 4, 128))
            run_case(f"flash {kern} {str(dtype)[6:]} D=128 varlen", dtype,
                     flash_varlen(dtype, [300, 0, 77, 5, 129], [300, 0, 77, 0, 200], 8, 2, 128))
        if kern == "sm80":
            run_case("flash sm80 bfloat16 D=32 GQA L=197 masked", torch.bfloat16,
                     flash_dense(torch.bfloat16, 3, 197, 8, 2, 32, lengths=[197, 61, 0]))
    for plain, kern in (("0", "sm80"), ("0", "sm90"), ("1", "sm80")):
        os.environ["NVEMBED_INFONCE_CUDA_PLAIN"] = plain
        os.environ["NVEMBED_INFONCE_KERNEL"] = kern
        tag = "plain" if plain == "1" else f"tc-{kern}"
        for dtype in (torch.bfloat16, torch.float16):
            run_case(f"infonce {tag} {str(dtype)[6:]} B=300 G=4 d=128 +17 inb", dtype,
                     infonce(dtype, 300, 4, 128, 17, True))
            run_case(f"infonce {tag} {str(dtype)[6:]} B=77 G=3 d=72 own-group", dtype,
                     infonce(dtype, 77, 3, 72, 0, False))
            run_case(f"infonce {tag} {str(dtype)[6:]} B=1 G=1 d=8 inb", dtype, infonce(dtype, 1, 1, 8, 0, True))
        run_case(f"infonce {tag} bfloat16 B=2048 G=8 d=1024 inb", torch.bfloat16,
                 infonce(torch.bfloat16, 2048, 8, 1024, 0, True))
    os.environ.pop("NVEMBED_INFONCE_CUDA_PLAIN")
    run_case("infonce float32 B=37 G=3 d=65 +5", torch.float32, infonce(torch.float32, 37, 3, 65, 5, True))
    # The GEMM paths, each: the B=300 case in its dtypes, small cases with ragged widths, one large case.
    #   gemm-bwd: the blocked-GEMM backward: one block; blocks of 37 / chunks of 9 (the chunk kernel's scalar path)
    #   gemm-fwd: the GEMM forward (with the blocked backward): one chunk; chunks of 9 (the lse kernel's scalar path)
    #   fused: gradients formed in the forward (NVEMBED_INFONCE_GRAD=fused): one row block; row blocks of 37
    #          queries (the fp32 dD accumulator; N = 236 docs: the chunk kernels' float4 paths, which N % 4 picks)
    #   fused-output: the same with the row blocks' dD updates added into the output (NVEMBED_INFONCE_FUSED_ACC)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    gemm = {"NVEMBED_INFONCE_KERNEL": "auto", "NVEMBED_INFONCE_BWD": "gemm"}
    gemm_paths = (
        ("gemm-bwd", gemm, (bf16, fp16), {"NVEMBED_INFONCE_BLOCK_COLS": "37", "NVEMBED_INFONCE_CHUNK_COLS": "9"},
         (("blocks 37 chunks 9", bf16, 72), ("blocks 37 chunks 9", fp32, 72))),
        ("gemm-fwd", {**gemm, "NVEMBED_INFONCE_FWD": "gemm"}, (bf16, fp16, fp32), {"NVEMBED_INFONCE_CHUNK_COLS": "9"},
         (("chunks 9", bf16, 72),)),
        ("fused", {"NVEMBED_INFONCE_KERNEL": "auto", "NVEMBED_INFONCE_GRAD": "fused"}, (bf16, fp16, fp32),
         {"NVEMBED_INFONCE_ROW_BLOCK": "37"}, (("row blocks 37", bf16, 73),)),
        ("fused-output", {"NVEMBED_INFONCE_KERNEL": "auto", "NVEMBED_INFONCE_GRAD": "fused",
                          "NVEMBED_INFONCE_FUSED_ACC": "output"}, (bf16,),
         {"NVEMBED_INFONCE_ROW_BLOCK": "37"}, (("row blocks 37", bf16, 73), ("row blocks 37", fp16, 72))),
    )
    for tag, variables, dtypes, small_variables, small in gemm_paths:
        with env_vars(variables):
            for dtype in dtypes:
                run_case(f"infonce {tag} {str(dtype)[6:]} B=300 G=4 d=128 +17 inb", dtype,
                         infonce(dtype, 300, 4, 128, 17, True))
            with env_vars(small_variables):
                for what, dtype, d in small:
                    run_case(f"infonce {tag} {str(dtype)[6:]} B=77 G=3 d={d} +5 {what}", dtype,
                             infonce(dtype, 77, 3, d, 5, True))
            run_case(f"infonce {tag} bfloat16 B=2048 G=8 d=1024 inb", bf16, infonce(bf16, 2048, 8, 1024, 0, True))
    # elementwise stages: ATen ops / csrc/cuda/latent_pool.cu; "saved": ATen ops, the forward keeping y1 and u
    for kernels in ("aten", "fused", "saved"):
        os.environ["NVEMBED_LATENT_POOL_KERNELS"] = "aten" if kernels == "saved" else kernels
        os.environ["NVEMBED_LATENT_POOL_SAVE_MB"] = "4096" if kernels == "saved" else "0"
        for dtype in (torch.bfloat16, torch.float32):
            run_case(f"latent_pool {kernels} {str(dtype)[6:]} B=3 L=37 d=64 N=16 H=2", dtype,
                     latent_pool(dtype, 3, 37, 64, 16, 2, 96))
        run_case(f"latent_pool {kernels} float16 B=2 L=300 d=64 N=16 H=2 F=37", torch.float16,
                 latent_pool(torch.float16, 2, 300, 64, 16, 2, 37))
    os.environ.pop("NVEMBED_LATENT_POOL_KERNELS")
    os.environ.pop("NVEMBED_LATENT_POOL_SAVE_MB")
    print(f"--- {len(failures)} failed" + (": " + "; ".join(failures) if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
