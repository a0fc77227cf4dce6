"""Autocast rules for the model ops (flash attention, latent pooling).

Inside ``torch.autocast(device_type, dtype)`` the forward ops cast their floating-point inputs to the region's
dtype before running, as torch does for its own matmul-class ops: a backbone under bf16 autocast may hand the
attention fp32 q/k/v (CUDA kernels take bf16/fp16 only), and the latent layer gets the last hidden state in one
dtype and fp32 parameters (the op wants them all in one dtype). The casts are differentiable, so gradients reach
the fp32 parameters in fp32. InfoNCE is left alone: the loss is computed on fp32 embeddings on purpose.
"""
import torch

_KEYS = {"cuda": torch._C.DispatchKey.AutocastCUDA, "cpu": torch._C.DispatchKey.AutocastCPU}
_lib = torch.library.Library("nvembed", "IMPL")
_CAST = (torch.float32, torch.float16, torch.bfloat16)


# op -> argument positions never cast (latent_pool's pool_mask may hold fractional weights; masks and cu_seqlens
# are not floating point anyway)
_OPS = {"_flash_attn_fwd": (), "_flash_attn_varlen_fwd": (), "_latent_pool_fwd": (1,), "_latent_pool_fwd_save": (1,)}


def _rule(op_name, device_type, keep):
    op = getattr(torch.ops.nvembed, op_name).default
    exclude = torch._C.DispatchKeySet(_KEYS[device_type])

    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        # like torch's own autocast: float32 / float16 / bfloat16 tensors are cast, float64 ones left alone
        cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype in _CAST and i not in keep else a
                for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return op(*cast)

    return kernel


for _name, _keep in _OPS.items():
    for _device in ("cuda", "cpu"):
        _lib.impl(_name, _rule(_name, _device, _keep), _KEYS[_device].name)
