"""Where the time of nvembed::latent_pool goes at NV-Embed-v2 size (B32 L512, d 4096, 512 latents, 8 heads x 4096,
F 16384, bf16, every token pooled): for the elementwise stages on ATen ops and on the fused kernels
(NVEMBED_LATENT_POOL_KERNELS=aten | fused; both recomputing every activation in the backward,
NVEMBED_LATENT_POOL_SAVE_MB=0), and for ATen stages with the forward keeping y1 and u (saved, fwd + bwd only), the
CUDA-event time of the forward and of forward + backward, then
torch.profiler's kernels of one forward + backward summed by kind:
  gemm      cuBLAS / CUTLASS GEMM kernels (the algebra's FLOPs; the part that runs at the GEMM rate)
  nvembed   our kernels (csrc/cuda/latent_pool.cu)
  other     every other kernel: ATen's elementwise passes, reductions, LayerNorm / softmax, copies
and the 12 kernels that took longest. The FLOPs the op actually executes (folded algebra, K / V once) are counted
from the shapes, so `gemm TFLOP/s` is that count over the GEMM kernels' time. bench/gpu_check.sh runs it (step
latent_pool_profile); --tiny runs a small layer in fp32 on the CPU in seconds (its test: the script cannot rot).

    python bench/gpu_profile_latent_pool.py [--out DIR] [--tiny]
"""
import argparse
import csv
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "python")]

import nvembed_ext  # noqa: E402,F401
from common import env_vars, select_device, time_calls  # noqa: E402
from gpu_latent_pool import FULL, TINY, Layer, make_inputs, random_values  # noqa: E402

KINDS = ("gemm", "nvembed", "other")
COLUMNS = ["device", "torch", "kernels", "mode", "ms", "gemm_ms", "nvembed_ms", "other_ms", "kernel_ms", "tflop",
           "gemm_tflops"]


def kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")) or \
            n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):  # (CPU, --tiny: ATen op names)
        return "gemm"
    if any(k in n for k in ("geglu_pool", "row_layer_norm", "row_softmax")):
        return "nvembed"
    return "other"


def executed_tflop(shape, tokens: int, backward: bool, saved: bool = False) -> float:
    """FLOPs of the folded algebra the op runs at this size: per token the scores and attention GEMMs against the
    folded [H*N, d] matrices and the feed-forward input GEMM; per call K / V of the latents and the two folds; the
    backward recomputes the forward (1x; with saved activations without the attention output and the feed-forward
    input GEMMs), runs two gradient GEMMs per forward GEMM (2x) and the latent side's six (the folds' and to_kv's
    gradients: 2x the per-call part)."""
    d, N, H, dh = shape.d, shape.latents, shape.heads, shape.dim_head
    F = 4 * d
    per_token = 2 * d * H * N * 2 + 2 * d * 2 * F
    per_call = 2 * N * d * 2 * H * dh + 2 * 2 * H * N * dh * d
    fwd = tokens * per_token + per_call + 2 * shape.batch * F * d
    recompute = fwd - (tokens * (2 * d * H * N + 2 * d * 2 * F) if saved else 0)
    return (fwd + (recompute + 2 * fwd + 2 * per_call if backward else 0)) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="directory for gpu_profile_latent_pool[_tiny].csv")
    ap.add_argument("--tiny", action="store_true", help="a small fp32 layer (runs on the CPU)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu (--tiny only)")
    args = ap.parse_args()
    device = select_device("gpu_profile_latent_pool", args.device, args.tiny, "the NV-Embed-v2-sized profile")
    if device is None:
        return 2
    on_cuda = device.type == "cuda"
    shape, dtype = (TINY, torch.float32) if args.tiny else (FULL, torch.bfloat16)
    layer = Layer(shape, random_values(shape, 0, device, dtype))
    hs, mask, gout = make_inputs(shape, "all", 1, device, dtype)
    tokens = shape.batch * shape.seqlen
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    print(f"{name}: latent_pool B{shape.batch} L{shape.seqlen} d{shape.d} N{shape.latents} H{shape.heads}x"
          f"{shape.dim_head} F{4 * shape.d} {str(dtype)[6:]}", flush=True)

    def fwd():
        with torch.no_grad():
            layer.module(hs, mask)

    def fwd_bwd():
        torch.autograd.grad(layer.module(hs, mask), [hs, *layer.weights], gout.to(dtype))

    rows = []
    variants = (("aten", "aten", "0"), ("fused", "fused", "0"), ("saved", "aten", "8192"))
    for kernels, stages, save_mb in variants:
        with env_vars({"NVEMBED_LATENT_POOL_KERNELS": stages, "NVEMBED_LATENT_POOL_SAVE_MB": save_mb}):
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                if kernels == "saved" and mode == "fwd":
                    continue  # the same forward as aten's (no gradients, nothing kept)
                ms = statistics.median(time_calls(fn, 1, 3 if args.tiny else 5, on_cuda))
                tflop = executed_tflop(shape, tokens, mode == "fwd+bwd", saved=kernels == "saved")
                acts = [ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
                with profile(activities=acts) as prof:
                    fn()
                    if on_cuda:
                        torch.cuda.synchronize()
                spent = {k: 0.0 for k in KINDS}
                for e in prof.key_averages():  # kernels on CUDA; ATen ops' own time on the CPU
                    spent[kind(e.key)] += (e.device_time_total if on_cuda else e.self_cpu_time_total) / 1e3
                total = sum(spent.values())
                row = {"device": name, "torch": torch.__version__, "kernels": kernels, "mode": mode,
                       "ms": round(ms, 3), "kernel_ms": round(total, 3), "tflop": float(f"{tflop:.4g}"),
                       "gemm_tflops": round(tflop / spent["gemm"] * 1e3, 1) if spent["gemm"] > 0 else ""}
                row.update({f"{k}_ms": round(v, 3) for k, v in spent.items()})
                rows.append(row)
                print(f"{kernels:5s} {mode:7s} {ms:9.3f} ms; kernels {total:9.3f} ms = gemm {spent['gemm']:.3f} + "
                      f"nvembed {spent['nvembed']:.3f} + other {spent['other']:.3f}; executed {tflop:.4g} TFLOP, "
                      f"{row['gemm_tflops']} TFLOP/s in the GEMMs", flush=True)
                if mode == "fwd+bwd":
                    print(prof.key_averages().table(sort_by="cuda_time_total" if on_cuda else "self_cpu_time_total",
                                                    row_limit=12, max_name_column_width=90), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "gpu_profile_latent_pool" + ("_tiny" if args.tiny else "") + ".csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
