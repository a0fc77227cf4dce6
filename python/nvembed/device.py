"""Device and dtype choice for running a model: "auto" / "cpu" / "cuda" / "cuda:N" and float32 / bfloat16 /
float16, checked before anything is loaded, so a bad choice is one clear error instead of a failure deep in a
forward pass.

Default dtype per device: float32 on the CPU (the CPU kernels are exact there, and bf16 is not faster on CPUs
without bf16 matrix units), bfloat16 on CUDA (the release runs its forward under fp16 autocast on CUDA; bf16 has
fp32's exponent range, so 7B-sized activations cannot overflow, and it is what the GPU kernels target).
Embeddings are returned as float32 whatever the compute dtype.
"""
from __future__ import annotations

import re
from typing import Optional, Union

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What the CPU kernels (flash_attn, latent_pool) accept; float16 exists only for CUDA.
CPU_DTYPES = ("float32", "bfloat16")

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def check_device_syntax(device: str, where: str = "device") -> str:
    """`device` if it reads auto, cpu, cuda or cuda:N (nothing about this machine is checked)."""
    m = _DEVICE_RE.match(device) if isinstance(device, str) else None
    # an index only for cuda (and cpu:0, the CPU as torch names it with an index)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda" and device != "cpu:0"):
        raise ValueError(f"{where} must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


# The ops a model forward runs (the backbone's attention and the latent-attention head).
MODEL_OPS = ("nvembed::_flash_attn_fwd", "nvembed::_latent_pool_fwd")


def model_ops_have_cuda() -> bool:
    """Whether this build has CUDA kernels for every op a model forward needs (a CUDA build registers flash_attn's
    sm80 kernels and latent_pool's ATen implementation; a CPU-only build has neither, and "auto" then stays on the
    CPU even on a GPU machine instead of failing there)."""
    import nvembed_ext  # noqa: F401  (registers the ops)
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in MODEL_OPS)
    except RuntimeError:
        return False


def resolve_device(device: Union[str, torch.device, None], where: str = "device") -> torch.device:
    """The torch.device to run on: "auto" (or None) = cuda when torch.cuda.is_available() and the model ops
    have CUDA kernels in this build (model_ops_have_cuda), else cpu; "cuda" /
    "cuda:N" must exist on this machine."""
    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        device = str(device)
    check_device_syntax(device, where)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and model_ops_have_cuda() else "cpu")
    if device in ("cpu", "cpu:0"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{where} {device!r}: CUDA is not available on this machine "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is False); use cpu")
    count = torch.cuda.device_count()
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    if index >= count:
        names = ", ".join(f"cuda:{i}" for i in range(count))
        raise ValueError(f"{where} {device!r} does not exist: this machine has {count} CUDA "
                         f"device{'s' if count != 1 else ''} ({names})")
    return torch.device("cuda", index)


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device,
                  where: str = "dtype") -> torch.dtype:
    """The compute dtype: None = the device's default (float32 on cpu, bfloat16 on cuda); a name or torch dtype
    among float32 / bfloat16 / float16; float16 only on CUDA (the CPU kernels take float32 and bfloat16)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        names = [n for n, t in DTYPES.items() if t == dtype]
        if not names:
            raise ValueError(f"{where} must be one of {', '.join(DTYPES)}, got {dtype}")
        name = names[0]
    elif isinstance(dtype, str) and dtype in DTYPES:
        name = dtype
    else:
        raise ValueError(f"{where} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.type == "cpu" and name not in CPU_DTYPES:
        raise ValueError(f"{where} {name} is not supported on the CPU (the CPU kernels take "
                         f"{' and '.join(CPU_DTYPES)}); use it with a CUDA device")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def describe(device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """"cpu float32" / "cuda:0 (NVIDIA H100 80GB HBM3) bfloat16": for log lines."""
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return name + (f" {dtype_name(dtype)}" if dtype is not None else "")
