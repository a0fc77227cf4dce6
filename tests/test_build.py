"""The installed library: registration, build info, every op schema present."""
import torch

import nvembed_ext


def test_build_info():
    info = nvembed_ext.build_info()
    assert set(info) >= {"version", "with_cuda", "cuda_archs", "cpu_isa", "cpu_flags", "cpu_blas", "torch"}
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        assert "90a" in info["cuda_archs"] and "80" in info["cuda_archs"]


def test_every_op_is_registered():
    for name in ["flash_attn", "_flash_attn_fwd", "_flash_attn_bwd", "flash_attn_varlen", "_flash_attn_varlen_fwd",
                 "_flash_attn_varlen_bwd", "infonce", "_infonce_fwd", "_infonce_bwd", "latent_pool"]:
        assert hasattr(torch.ops.nvembed, name), name


def test_public_schemas():
    schemas = {op: str(getattr(torch.ops.nvembed, op).default._schema) for op in
               ["flash_attn", "flash_attn_varlen", "infonce"]}
    assert schemas["flash_attn"] == ("nvembed::flash_attn(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask=None, "
                                     "float? scale=None) -> Tensor")
    assert schemas["flash_attn_varlen"] == (
        "nvembed::flash_attn_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float? scale=None) -> Tensor")
    assert schemas["infonce"] == ("nvembed::infonce(Tensor queries, Tensor docs, int group_size, float temperature, "
                                  "bool in_batch_negatives=True) -> Tensor")
