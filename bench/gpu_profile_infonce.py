"""Where the time of one nvembed::infonce forward + backward goes on a GPU: for each kernel choice (the sm80
tensor-core kernels, the Hopper forward, the plain fp32 path, the blocked-GEMM backward, the GEMM forward, the
gradients formed in the forward) the
CUDA-event time of the forward alone and of
forward + backward, and torch.profiler's per-kernel table. bench/gpu_check.sh runs it (step infonce_profile).

    python bench/gpu_profile_infonce.py [--B 4096] [--d 1024] [--G 8]
"""
import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "python")]

import nvembed_ext  # noqa: E402,F401
from common import time_calls  # noqa: E402

ops = torch.ops.nvembed


def timed(fn):
    """Median CUDA-event milliseconds of 5 calls after one warm-up."""
    return statistics.median(time_calls(fn, 1, 5, True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--G", type=int, default=8)
    args = ap.parse_args()
    B, d, G = args.B, args.d, args.G
    N = B * G
    q = (torch.randn(B, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5).requires_grad_()
    docs = (torch.randn(N, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5).requires_grad_()
    flop = 2.0 * B * N * d
    print(f"{torch.cuda.get_device_name()}: B={B} N={N} d={d} bf16; fwd {flop / 1e12:.3f} TFLOP, fwd+bwd "
          f"{3 * flop / 1e12:.3f}", flush=True)

    def fwd():
        with torch.no_grad():
            ops.infonce(q, docs, G, 0.05, True)

    def fwd_bwd():
        ops.infonce(q, docs, G, 0.05, True).backward()

    def naive():
        torch.nn.functional.cross_entropy((q @ docs.T).float() / 0.05,
                                          torch.arange(B, device="cuda") * G).backward()

    print(f"naive fwd+bwd {timed(naive):.3f} ms", flush=True)
    for plain, kern, fwd_path, bwd_path, grad in (("0", "sm80", "tiles", "tiles", "backward"),
                                                  ("0", "sm90", "tiles", "tiles", "backward"),
                                                  ("1", "sm80", "tiles", "tiles", "backward"),
                                                  ("0", "auto", "tiles", "gemm", "backward"),
                                                  ("0", "auto", "gemm", "gemm", "backward"),
                                                  ("0", "auto", "gemm", "gemm", "fused")):
        os.environ["NVEMBED_INFONCE_CUDA_PLAIN"] = plain
        os.environ["NVEMBED_INFONCE_KERNEL"] = kern
        os.environ["NVEMBED_INFONCE_FWD"] = fwd_path
        os.environ["NVEMBED_INFONCE_BWD"] = bwd_path
        os.environ["NVEMBED_INFONCE_GRAD"] = grad  # fused: fwd (no grad) is the GEMM forward, fwd+bwd the fused one
        tag = "fused" if grad == "fused" else "plain" if plain == "1" else kern if bwd_path == "tiles" else \
            "gemm-bwd" if fwd_path == "tiles" else "gemm"
        tf, tfb = timed(fwd), timed(fwd_bwd)
        print(f"{tag:8s} fwd {tf:9.3f} ms ({flop / tf / 1e9:7.1f} TFLOP/s)  fwd+bwd {tfb:9.3f} ms "
              f"({3 * flop / tfb / 1e9:7.1f} TFLOP/s)", flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd_bwd()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=90),
              flush=True)


if __name__ == "__main__":
    main()
