"""Small flash-attention cases for compute-sanitizer (run by bench/gpu_check.sh under memcheck and racecheck):
forward + backward of every CUDA template instantiation the ops have (bf16 at head dims 32 / 64 / 128, fp16 at 64),
each with GQA, a ragged key mask, a batch row without keys and lengths that are not multiples of any tile, then the
varlen op with an empty sequence and a sequence with queries but no keys. On a compute capability 9.0 device with a
build that has sm_90a code, the cases run again on the Hopper kernels (NVEMBED_FLASH_KERNEL=sm90: TMA loads past
a tensor's end are zero-filled by the hardware, so memcheck checks their stores and their other loads).

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (gpu_check.sh does): every tensor is then its own cudaMalloc, so
memcheck sees an access past a tensor's end instead of landing silently in a neighbour from the caching pool.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_flash.py
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

import nvembed_ext  # noqa: E402,F401  (registers torch.ops.nvembed.*)

ops = torch.ops.nvembed
DEV = "cuda"


def dense_case(dtype, D, B=2, L=70, Hq=4, Hkv=2, fully_masked_row=False):
    q = torch.randn(B, L, Hq, D, device=DEV, dtype=dtype).requires_grad_()
    k = torch.randn(B, L, Hkv, D, device=DEV, dtype=dtype).requires_grad_()
    v = torch.randn(B, L, Hkv, D, device=DEV, dtype=dtype).requires_grad_()
    lengths = torch.tensor([L, 33] + [L] * (B - 2))
    if fully_masked_row:
        lengths[-1] = 0
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(DEV)
    out = ops.flash_attn(q, k, v, mask)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def varlen_case(dtype, D, Hq=4, Hkv=2):
    lens_q, lens_k = [70, 0, 33, 5], [70, 0, 33, 0]  # an empty sequence; queries without keys
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q = torch.randn(sum(lens_q), Hq, D, device=DEV, dtype=dtype).requires_grad_()
    k = torch.randn(sum(lens_k), Hkv, D, device=DEV, dtype=dtype).requires_grad_()
    v = torch.randn(sum(lens_k), Hkv, D, device=DEV, dtype=dtype).requires_grad_()
    out = ops.flash_attn_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def all_cases():
    for D in (32, 64, 128):
        dense_case(torch.bfloat16, D)
    dense_case(torch.float16, 64)
    dense_case(torch.bfloat16, 64, B=3, fully_masked_row=True)
    dense_case(torch.bfloat16, 128, L=1, Hq=2, Hkv=1)
    for D in (64, 128):
        varlen_case(torch.bfloat16, D)


def main():
    torch.manual_seed(0)
    os.environ["NVEMBED_FLASH_KERNEL"] = "sm80"
    all_cases()
    major, minor = torch.cuda.get_device_capability()
    os.environ["NVEMBED_FLASH_KERNEL"] = "sm90"
    if nvembed_ext._C.flash_kernel_for(major, minor, 128) == "sm90":
        all_cases()
        dense_case(torch.float16, 128, B=3, L=300, fully_masked_row=True)
        print("flash sanitizer cases done (sm80 and sm90 kernels)")
    else:
        print("flash sanitizer cases done (sm80 kernels; the Hopper kernels do not run here)")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
