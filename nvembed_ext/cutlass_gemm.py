"""A CUTLASS 3 Hopper GEMM for benchmarks (csrc/cuda/gemm_sm90.cu: CUTLASS's warp-specialized cooperative TMA +
wgmma kernel, built from its collective builders): bench/gpu_gemm_compare.py measures it against cuBLAS (what
torch.matmul and the ops' ATen paths run) on latent pooling's GEMM shapes. Not an op: no autograd, no CPU version."""
from __future__ import annotations

import torch

from . import _C


def available(device=None) -> str | None:
    """None if cutlass_gemm can run on `device` (default: the current CUDA device), else why not."""
    if not hasattr(_C, "gemm_sm90_bf16"):
        return "this build has no CUDA kernels"
    if "90a" not in _C.build_info()["cuda_archs"].split(","):
        return "this build has no sm_90a code (NVEMBED_CUDA_ARCHS)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"needs compute capability 9.0, the device has {major}.{minor}"
    return None


def cutlass_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b[N, K].T -> [M, N], bf16 CUDA tensors, fp32 accumulation (the layout of x @ W.T for a Linear
    weight W)."""
    why = available(a.device if a.is_cuda else None)
    if why is not None:
        raise RuntimeError(f"nvembed.cutlass_gemm: {why}")
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.bfloat16 or t.dim() != 2 or not t.is_cuda:
            raise ValueError(f"nvembed.cutlass_gemm: {name} must be a 2-d bfloat16 CUDA tensor, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    (M, K), (N, K2) = a.shape, b.shape
    if K != K2 or K % 8 or N % 8 or M == 0 or N == 0 or K == 0:
        raise ValueError(f"nvembed.cutlass_gemm: needs a [M, K], b [N, K] with K and N multiples of 8 and no empty "
                         f"dimension, got {tuple(a.shape)} and {tuple(b.shape)}")
    if b.device != a.device:
        raise ValueError(f"nvembed.cutlass_gemm: b is on {b.device} but a is on {a.device}")
    a, b = _tma_operand(a), _tma_operand(b)
    with torch.cuda.device(a.device):  # the kernel runs on (and sizes its grid for) the current device
        d = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
        ws_bytes = _C.gemm_sm90_bf16_workspace(M, N, K)
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=a.device)
        _C.gemm_sm90_bf16(a.data_ptr(), b.data_ptr(), d.data_ptr(), M, N, K, ws.data_ptr(),
                          torch.cuda.current_stream(a.device).cuda_stream)
    return d


def _tma_operand(t: torch.Tensor) -> torch.Tensor:
    """t contiguous at a 16-byte aligned address, as TMA descriptors need (CUTLASS's can_implement checks shapes and
    strides only; a view at an odd storage offset would reach the descriptor set-up, which has no error path)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()
