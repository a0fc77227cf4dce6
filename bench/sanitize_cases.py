"""Small InfoNCE and latent_pool cases for compute-sanitizer (run by bench/gpu_check.sh under memcheck and
racecheck; the flash-attention cases are bench/sanitize_flash.py). Each row of the tables below is one forward +
backward under its own environment (the ops read their variables on every call):

- InfoNCE's tensor-core path (bf16 / fp16; 2 query blocks, 3 doc tiles, the split forward and dQ pass; d % 8 != 0
  through the padded copy) with the sm80 and the Hopper forward, the plain fp32-FMA path (fp32, own-group), the
  blocked-GEMM backward (its chunk kernel's float4 path, and its scalar path into a strided block buffer), the GEMM
  forward (the online log-sum-exp kernel's float4 and scalar paths) and the gradients formed in the forward (one row
  block; row blocks of 37 queries through the fp32 dD accumulator, targets mid-docs, d % 4 != 0);
- latent_pool's fused stages (csrc/cuda/latent_pool.cu: LayerNorm rows, softmax rows, GEGLU's 4-column and scalar
  paths, units cut at 64 tokens, a batch row without pooled tokens).

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (gpu_check.sh does): every tensor is then its own cudaMalloc, so
memcheck sees an access past a tensor's end instead of landing silently in a neighbour from the caching pool.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_cases.py

`--device cpu` runs the same table on CPU tensors (CI: every environment value is one the ops accept, every case
runs and its outputs are finite; the CUDA-only variables are read there too). The CPU kernels have no fp16, so
fp16 cases run in bf16 there.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python"), HERE]

import nvembed_ext  # noqa: E402,F401  (registers torch.ops.nvembed.*)
from common import env_vars  # noqa: E402

ops = torch.ops.nvembed
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _infonce_env(**variables):
    return {f"NVEMBED_INFONCE_{k}": str(v) for k, v in variables.items()}


# (environment, dtype, in-batch negatives, B, G, d, extra negatives)
INFONCE_CASES = (
    # the tile kernels: tensor-core path with the sm80 and the Hopper forward (sm90: where it applies, else sm80
    # again), and the plain path forced
    [(_infonce_env(CUDA_PLAIN=plain, KERNEL=kernel), dtype, True, B, G, d, extra)
     for plain, kernel in (("0", "sm80"), ("0", "sm90"), ("1", "sm80"))
     for dtype in (BF16, FP16)
     for B, G, d, extra in ((130, 2, 72, 3), (37, 3, 65, 0))]
    + [(_infonce_env(CUDA_PLAIN=plain, KERNEL=kernel), FP16, False, 37, 3, 65, 0)
       for plain, kernel in (("0", "sm80"), ("0", "sm90"), ("1", "sm80"))]
    + [({}, FP32, True, 37, 3, 65, 5)]
    # the blocked-GEMM backward: one block and chunk of 264 docs (float4 path), then blocks of 37 docs in chunks of 9
    # (scalar path into a strided block buffer)
    + [(_infonce_env(BWD="gemm"), dtype, True, 130, 2, 72, 4) for dtype in (BF16, FP16, FP32)]
    + [(_infonce_env(BWD="gemm", BLOCK_COLS=37, CHUNK_COLS=9), BF16, True, 130, 2, 72, 3)]
    # the GEMM forward: one chunk of 264 docs (float4 path), then chunks of 9 (scalar path)
    + [(_infonce_env(FWD="gemm"), dtype, True, 130, 2, 72, 4) for dtype in (BF16, FP32)]
    + [(_infonce_env(FWD="gemm", CHUNK_COLS=9), FP16, True, 130, 2, 72, 3)]
    # gradients formed in the forward: one row block (float4 paths), then row blocks of 37 queries with d % 4 != 0
    + [(_infonce_env(GRAD="fused"), dtype, True, 130, 2, 72, 4) for dtype in (BF16, FP32)]
    + [(_infonce_env(GRAD="fused", ROW_BLOCK=37), FP16, True, 130, 2, 65, 3)]
    # ... the row blocks' dD updates added into the bf16 output (cuBLAS beta = 1), float4 in-place passes
    + [(_infonce_env(GRAD="fused", ROW_BLOCK=37, FUSED_ACC="output"), BF16, True, 130, 2, 72, 4)])

# (environment, dtype, B, L, d, latents, heads, dim_head, ff_hidden)
LATENT_POOL_CASES = [
    ({"NVEMBED_LATENT_POOL_KERNELS": "fused"}, BF16, 3, 150, 64, 8, 2, 32, 1028),  # F % 4 == 0, a ragged last CTA
    ({"NVEMBED_LATENT_POOL_KERNELS": "fused"}, FP32, 2, 70, 32, 5, 2, 16, 37),     # odd F: one column per thread
    # saved activations (ATen stages): the forward writes y1 / u rows and zeroes the rest, the backward reads them
    ({"NVEMBED_LATENT_POOL_KERNELS": "aten", "NVEMBED_LATENT_POOL_SAVE_MB": "4096"}, BF16, 3, 150, 64, 8, 2, 32, 96),
    # ... with the fused stages (auto's stages), fp16
    ({"NVEMBED_LATENT_POOL_KERNELS": "fused", "NVEMBED_LATENT_POOL_SAVE_MB": "4096"}, FP16, 2, 70, 64, 8, 2, 32, 96),
]


def _dtype(device, dtype):
    return BF16 if device == "cpu" and dtype == FP16 else dtype


def infonce_case(device, dtype, in_batch, B, G, d, extra):
    dtype = _dtype(device, dtype)
    q = (torch.randn(B, d, device=device, dtype=dtype) / 8).requires_grad_()
    docs = (torch.randn(B * G + extra, d, device=device, dtype=dtype) / 8).requires_grad_()
    loss = ops.infonce(q, docs, G, 0.05, in_batch)
    loss.backward()
    return [loss, q.grad, docs.grad]


def latent_pool_case(device, dtype, B, L, d, N, H, dh, F):
    dtype = _dtype(device, dtype)
    def p(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()
    x = p(B, L, d)
    mask = (torch.rand(B, L, device=device) < 0.8).to(torch.int64)
    mask[0] = 0  # a row without pooled tokens: output 0, zero gradients
    inner = H * dh
    w = [p(N, d), p(d), p(d), p(d), p(d), p(inner, d, scale=d ** -0.5), p(2 * inner, d, scale=d ** -0.5),
         p(d, inner, scale=inner ** -0.5), p(d), p(d), p(2 * F, d, scale=d ** -0.5), p(2 * F), p(d, F, scale=F ** -0.5),
         p(d)]
    out = ops.latent_pool(x, mask, *w, H, True, 1e-5)
    out.square().sum().backward()
    return [out, x.grad] + [t.grad for t in w]


def case_label(env):
    """The path a case's environment selects, as bench/gpu_verdict.py names it."""
    if env.get("NVEMBED_LATENT_POOL_SAVE_MB", "0") != "0":
        return "latent_pool-saved"
    if env.get("NVEMBED_LATENT_POOL_KERNELS") == "fused":
        return "latent_pool-fused"
    if env.get("NVEMBED_INFONCE_GRAD") == "fused":
        return "infonce-fused"
    if env.get("NVEMBED_INFONCE_FWD") == "gemm":
        return "infonce-gemm-fwd"
    if env.get("NVEMBED_INFONCE_BWD") == "gemm":
        return "infonce-gemm-bwd"
    return "tiles"


def run(device):
    torch.manual_seed(0)
    if device == "cuda":
        # start cuBLAS / cuBLASLt (the GEMM paths' first call would) before the first header: whatever the sanitizer
        # reports about their start-up lands before any case, not in the first GEMM path's
        a = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        torch.mm(a, a)
        try:
            torch.mm(a, a, out_dtype=torch.float32)  # the bf16 -> fp32 GEMM of the chunked paths
        except TypeError:  # a torch without the overload (the paths then fail in their own case)
            pass
        torch.cuda.synchronize()
    cases = ([(env, infonce_case, args) for env, *args in INFONCE_CASES]
             + [(env, latent_pool_case, args) for env, *args in LATENT_POOL_CASES])
    for i, (env, fn, args) in enumerate(cases):
        # the header names the case whose kernels compute-sanitizer reports below it (each case ends synchronized),
        # so bench/gpu_verdict.py can charge an error to the path that made it
        print(f"case {i} {fn.__name__} {case_label(env)} {args}", flush=True)
        with env_vars(env):
            outs = fn(device, *args)
            if device == "cuda":
                torch.cuda.synchronize()
        bad = [j for j, t in enumerate(outs) if t is None or not torch.isfinite(t).all()]
        if bad:
            raise SystemExit(f"case {i} ({fn.__name__}, {env}, {args}): outputs {bad} missing or not finite")
    print(f"sanitizer cases done: {len(INFONCE_CASES)} infonce, {len(LATENT_POOL_CASES)} latent_pool on {device}")
    return len(cases)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    run(parser.parse_args(argv).device)


if __name__ == "__main__":
    main()
