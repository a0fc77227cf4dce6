"""cuBLAS against CUTLASS on latent pooling's GEMMs (issue 7: "cuBLAS through ATen is acceptable only where
measured faster"). For each shape, bf16 in, fp32 accumulation, bf16 out, D = A B^T with A [M, K], B [N, K]:
  cublas   torch.matmul(a, b.T): what the op's ATen path (csrc/latent_pool_aten.cpp) runs
  cutlass  nvembed_ext.cutlass_gemm: CUTLASS 3's warp-specialized cooperative TMA + wgmma kernel from its collective
           builders (csrc/cuda/gemm_sm90.cu; 128 x 256 x 64 tiles, 2 x 1 clusters), sm_90a only
on fresh random inputs, agreement first (relative Frobenius error of cutlass against cublas), then the median
CUDA-event time of --iters calls after --warmup. Shapes: the NV-Embed-v2 layer's per-chunk GEMMs with 4096-token
chunks (the fused path's) and an 8192^3 reference.

    python bench/gpu_gemm_compare.py --out DIR [--iters 20]
    python bench/gpu_gemm_compare.py --tiny --device cpu --out DIR   # small shapes; cutlass is "unavailable"
"""
import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "python")]

from common import device_name, git_commit, select_device, time_calls, write_csv  # noqa: E402

COLUMNS = ["gpu", "torch", "commit", "shape", "M", "N", "K", "provider", "status", "ms", "tflops", "rel_err",
           "speedup_vs_cublas"]
# (name, M, N, K): t = 4096 tokens per chunk, d = 4096, 2F = 32768, H*N = 4096 latent rows
SHAPES = [
    ("ff_in: z W_in^T", 4096, 32768, 4096),
    ("ff_in grad input: du W_in", 4096, 4096, 32768),
    ("ff_in grad weight: du^T z", 32768, 4096, 4096),
    ("scores / attention / their grads", 4096, 4096, 4096),
    ("reference 8192^3", 8192, 8192, 8192),
]
TINY = [("tiny a", 64, 128, 64), ("tiny b", 40, 8, 24)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="small shapes (runs on the CPU: cublas rows only)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    device = select_device("gpu_gemm_compare", args.device, args.tiny, "the layer's shapes")
    if device is None:
        return 2
    on_cuda = device.type == "cuda"
    import nvembed_ext  # noqa: F401
    from nvembed_ext.cutlass_gemm import available, cutlass_gemm

    why = available(device) if on_cuda else "no CUDA device"
    env = {"gpu": device_name(device) if on_cuda else f"cpu: {device_name(device)}", "torch": torch.__version__,
           "commit": git_commit()}
    print(f"{env['gpu']}, torch {env['torch']}; cutlass: {why or 'available'}", flush=True)
    rows, mismatch = [], False
    gen = torch.Generator(device=device).manual_seed(0)
    for name, M, N, K in (TINY if args.tiny else SHAPES):
        dtype = torch.bfloat16
        a = torch.randn(M, K, device=device, generator=gen).to(dtype)
        b = torch.randn(N, K, device=device, generator=gen).to(dtype) / K ** 0.5
        flop = 2.0 * M * N * K
        ref = torch.matmul(a, b.T)
        base = {**env, "shape": name, "M": M, "N": N, "K": K}
        times = {}
        for provider in ("cublas", "cutlass"):
            row = {**base, "provider": provider}
            if provider == "cutlass" and why is not None:
                row["status"] = f"unavailable: {why}"
                rows.append(row)
                continue
            fn = (lambda: torch.matmul(a, b.T)) if provider == "cublas" else (lambda: cutlass_gemm(a, b))
            out = fn()
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
            row["rel_err"] = float(f"{err:.3g}")
            if err > 1e-2:  # both round one fp32 accumulation to bf16: they should agree to a few bf16 ulps
                row["status"] = "mismatch"
                mismatch = True
                rows.append(row)
                continue
            ms = statistics.median(time_calls(fn, args.warmup, args.iters, on_cuda))
            times[provider] = ms
            row.update({"status": "ok", "ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)})
            rows.append(row)
        if "cutlass" in times:
            rows[-1]["speedup_vs_cublas"] = round(times["cublas"] / times["cutlass"], 3)
        shown = "  ".join(f"{p} {times[p]:.3f} ms ({flop / times[p] / 1e9:.1f} TFLOP/s)" for p in times)
        print(f"  {name:36s} M={M} N={N} K={K}: {shown}", flush=True)
        del a, b, ref
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_gemm_compare" + ("_tiny" if args.tiny else "") + ".csv")
    write_csv(path, rows, COLUMNS)
    print(f"wrote {path}")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
