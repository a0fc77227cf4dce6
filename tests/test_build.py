"""The installed library: registration, build info, every op schema present."""
import torch

import nvembed_ext


def test_build_info():
    info = nvembed_ext.build_info()
    assert set(info) >= {"version", "with_cuda", "cuda_archs", "cpu_isa", "cpu_flags", "cpu_blas", "torch"}
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        assert "90a" in info["cuda_archs"] and "80" in info["cuda_archs"]


def test_library_records_the_torch_it_was_built_against():
    """setup.py writes nvembed_ext/_build_meta.py beside the library; import compares it with the running torch
    (a mismatch is an ImportError naming both versions, not an undefined C++ symbol)."""
    assert nvembed_ext.build_info()["built_with_torch"] == torch.__version__


def test_sdist_holds_the_sources_the_build_compiles(tmp_path):
    """The extension declares no sources of its own (CMake builds csrc/): MANIFEST.in must put them in the sdist, or
    an install from it fails at CMake's configure step."""
    import os
    import subprocess
    import sys
    import tarfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=root, check=True,
                   capture_output=True, timeout=300)
    (sdist,) = tmp_path.glob("nvembed-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {"CMakeLists.txt", "requirements-build.txt", "tools/dev_build.sh"}
    for base, _, files in os.walk(os.path.join(root, "csrc")):
        expected |= {os.path.relpath(os.path.join(base, f), root) for f in files
                     if f.endswith((".cpp", ".h", ".cu", ".cuh"))}
    assert expected <= names, sorted(expected - names)[:10]
    assert "nvembed_ext/_build_meta.py" not in names  # written by each build, not shipped


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
