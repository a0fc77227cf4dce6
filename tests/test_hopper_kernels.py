"""The Hopper kernels — flash attention (csrc/cuda/flash_sm90.cuh forward, flash_sm90_bwd.cuh dQ and dK/dV) and the
InfoNCE forward (infonce_sm90.cuh): TMA + wgmma, warp-specialized — on any machine: which kernels the dispatchers
pick (NVEMBED_FLASH_KERNEL, NVEMBED_INFONCE_KERNEL), what the compiled sm_90a code contains — HGMMA (wgmma), UTMALDG (TMA loads) and USETMAXREG (register reallocation) in SASS,
no local-memory spills — read from the built library with cuobjdump (the CUDA toolkit's, or the copy triton ships),
and the host-side layout checks of tools/sm90_check.

Their numerics on a GPU are tested in tests/test_flash_attn_cuda.py and tests/test_infonce_cuda.py (the reference
tests run once per kernel set; the sm90 runs need a compute capability 9.0 device) and measured by
bench/gpu_attention.py (nvembed-sm90) and bench/gpu_infonce.py (nvembed-sm90).
"""
import glob
import os
import re
import shutil
import subprocess

import pytest

import nvembed_ext
from nvembed_ext import _C

INFO = nvembed_ext.build_info()
HAS_SM90A = INFO["with_cuda"] and "90a" in INFO["cuda_archs"].split(",")
ENV = "NVEMBED_FLASH_KERNEL"


# ---- dispatcher -------------------------------------------------------------------------------------------------

def test_auto_picks_the_hopper_kernel_where_it_applies(monkeypatch):
    """auto (the default; the Hopper kernels were verified on an H200) picks the sm90 kernel on compute capability
    9.0 for head dims 64 / 128 in an sm_90a build, and the sm80 kernel everywhere else."""
    hopper = "sm90" if HAS_SM90A else "sm80"
    for value in (None, "", "auto"):
        if value is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, value)
        for cap in [(8, 0), (8, 9), (9, 0), (10, 0), (12, 0)]:
            for d in (32, 64, 128):
                want = hopper if cap == (9, 0) and d in (64, 128) else "sm80"
                assert _C.flash_kernel_for(*cap, d) == want, (value, cap, d)
                assert _C.flash_kernel_for(*cap, d, backward=True) == want, (value, cap, d)


def test_sm90_choice_applies_only_on_sm90_with_supported_head_dims(monkeypatch):
    monkeypatch.setenv(ENV, "sm90")
    expected = "sm90" if HAS_SM90A else "sm80"  # without sm_90a code in the build the kernel body does not exist
    assert _C.flash_kernel_for(9, 0, 64) == expected
    assert _C.flash_kernel_for(9, 0, 128) == expected
    assert _C.flash_kernel_for(9, 0, 32) == "sm80"  # head dim 32 has no Hopper instantiation
    for cap in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0)]:  # sm_90a code runs on 9.0 only
        assert _C.flash_kernel_for(*cap, 128) == "sm80"
    monkeypatch.setenv(ENV, "sm80")
    assert _C.flash_kernel_for(9, 0, 128) == "sm80"


def test_backward_follows_the_same_rule(monkeypatch):
    monkeypatch.setenv(ENV, "sm80")
    assert _C.flash_kernel_for(9, 0, 128, backward=True) == "sm80"
    monkeypatch.setenv(ENV, "sm90")
    expected = "sm90" if HAS_SM90A else "sm80"
    assert _C.flash_kernel_for(9, 0, 64, backward=True) == expected
    assert _C.flash_kernel_for(9, 0, 128, backward=True) == expected
    assert _C.flash_kernel_for(9, 0, 32, backward=True) == "sm80"
    assert _C.flash_kernel_for(8, 0, 128, backward=True) == "sm80"


@pytest.mark.parametrize("value", ["hopper", "SM90", "1", "sm90a"])
def test_unknown_choice_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=rf"nvembed::flash_attn: NVEMBED_FLASH_KERNEL must be auto, sm80 or "
                                         rf"sm90, got '{value}'"):
        _C.flash_kernel_for(9, 0, 128)


def test_infonce_forward_choice(monkeypatch):
    monkeypatch.delenv("NVEMBED_INFONCE_KERNEL", raising=False)  # auto: verified on an H200
    assert _C.infonce_fwd_kernel_for(9, 0) == ("sm90" if HAS_SM90A else "sm80")
    for cap in [(8, 0), (10, 0)]:
        assert _C.infonce_fwd_kernel_for(*cap) == "sm80"
    monkeypatch.setenv("NVEMBED_INFONCE_KERNEL", "sm80")
    assert _C.infonce_fwd_kernel_for(9, 0) == "sm80"
    monkeypatch.setenv("NVEMBED_INFONCE_KERNEL", "sm90")
    assert _C.infonce_fwd_kernel_for(9, 0) == ("sm90" if HAS_SM90A else "sm80")
    for cap in [(8, 0), (8, 9), (10, 0), (12, 0)]:
        assert _C.infonce_fwd_kernel_for(*cap) == "sm80"
    monkeypatch.setenv("NVEMBED_INFONCE_KERNEL", "wgmma")
    with pytest.raises(ValueError, match=r"nvembed::infonce: NVEMBED_INFONCE_KERNEL must be auto, sm80 or sm90, "
                                         r"got 'wgmma'"):
        _C.infonce_fwd_kernel_for(9, 0)


# ---- compiled code ------------------------------------------------------------------------------------------------

def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    for c in ["/usr/local/cuda/bin/cuobjdump", *sorted(glob.glob("/usr/local/cuda-*/bin/cuobjdump"))]:
        if os.path.exists(c):
            return c
    try:
        import triton  # ships cuobjdump with its NVIDIA backend
        c = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return c if os.path.exists(c) else None
    except ImportError:
        return None


_FUNCTION = re.compile(r"^\s*Function\s*:?\s*(\S+?):?\s*$")  # "Function : NAME" (-sass), "Function NAME:" (-res-usage)


def _functions(text: str, marker: str) -> dict:
    """{function name: its text} from cuobjdump output, for names containing `marker`."""
    out, name = {}, None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            name = m.group(1) if marker in m.group(1) else None
            if name:
                out[name] = []
        elif name:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def sm90a_code():
    if not HAS_SM90A:
        pytest.skip("this build has no sm_90a code (CPU-only build, or NVEMBED_CUDA_ARCHS without 90a)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton)")
    lib = _C.__file__
    run = lambda *a: subprocess.run([tool, *a, lib], check=True, capture_output=True, text=True, timeout=600).stdout
    sass = _functions(run("-sass", "-arch", "sm_90a"), "90")
    res = _functions(run("-res-usage", "-arch", "sm_90a"), "90")
    return sass, res


def test_hopper_kernels_sass_use_wgmma_tma_and_register_reallocation(sm90a_code):
    sass, _ = sm90a_code
    # fa90::sm90_kernel<K>: K = fa90::FwdKernel / DqKernel / DkdvKernel, or nce90::FwdKernel (InfoNCE)
    kernels = {n: t for n, t in sass.items() if "sm90_kernel" in n and "nce90" not in n}
    # bf16 / fp16 x head dims 64 / 128 x (forward, dQ, dK/dV)
    assert len(kernels) == 12, sorted(kernels)
    for name, text in kernels.items():
        d = 128 if "Li128E" in name else 64
        if "FwdKernel" in name:
            assert "HGMMA.64x128x16.F32" in text, f"{name}: no 64x128x16 wgmma for S = Q K^T"
            assert f"HGMMA.64x{d}x16.F32" in text, f"{name}: no 64x{d}x16 wgmma for O += P V"
        else:  # S, dP: 64 x 64 tiles per warpgroup; dQ / dK / dV: 64 x D
            assert "HGMMA.64x64x16.F32" in text, f"{name}: no 64x64x16 wgmma for S / dP"
            assert f"HGMMA.64x{d}x16.F32" in text, f"{name}: no 64x{d}x16 wgmma for the gradient GEMMs"
        assert "UTMALDG" in text, f"{name}: no TMA load"
        assert "USETMAXREG" in text, f"{name}: no register reallocation (setmaxnreg)"
        assert "SYNCS" in text, f"{name}: no mbarrier operations"
    infonce = {n: t for n, t in sass.items() if "sm90_kernel" in n and "nce90" in n}
    assert len(infonce) == 2, sorted(infonce)  # bf16, fp16
    for name, text in infonce.items():
        for needle in ("HGMMA.64x128x16.F32", "UTMALDG", "USETMAXREG", "SYNCS"):
            assert needle in text, f"{name}: no {needle}"


def test_cutlass_gemm_sass(sm90a_code):
    """The CUTLASS GEMM of bench/gpu_gemm_compare.py (csrc/cuda/gemm_sm90.cu): one kernel, 64 x 256 wgmma per consumer
    warp group (the cooperative schedule's 128 x 256 tile), TMA loads and stores, mbarriers, no local memory."""
    sass, res = sm90a_code
    gemm = {n: t for n, t in sass.items() if "GemmUniversal" in n}
    assert len(gemm) == 1, sorted(gemm)
    for name, text in gemm.items():
        for needle in ("HGMMA.64x256x16.F32.BF16", "UTMALDG", "UTMASTG", "SYNCS"):
            assert needle in text, f"{name}: no {needle}"
    usage = [t for n, t in res.items() if "GemmUniversal" in n]
    assert len(usage) == 1 and "LOCAL:0" in usage[0] and "STACK:0" in usage[0], usage


def test_hopper_kernels_have_no_local_memory(sm90a_code):
    """No register spills (ptxas with 240 registers per consumer thread) and no stack."""
    _, res = sm90a_code
    kernels = {n: t for n, t in res.items() if "sm90_kernel" in n}
    assert len(kernels) == 14, sorted(kernels)
    for name, text in kernels.items():
        assert "LOCAL:0" in text and "STACK:0" in text, f"{name}: {text.strip()}"


# ---- register / tile layouts, on the host -------------------------------------------------------------------------

def _nvcc():
    return shutil.which("nvcc") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))), None)


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (the check is host code, but includes the kernel header)")
def test_register_and_tile_layouts_host_check(tmp_path):
    """tools/sm90_check: for every instantiation and every consumer thread, the S accumulator register holding
    S(m, n) is the one the P V wgmma reads as A(m, n) (P reused in place), and likewise dS -> dQ, P^T -> dV,
    dS^T -> dK in the backward; a row's scores live in one quad of lanes and cover each column once (the softmax's
    two shuffles); the epilogue's column pairs; the transposed K / Q / dO tile views; shared memory and TMA byte
    counts. A planted swap of two modes in acc_as_a fails it (checked when it was written)."""
    import importlib.util
    if importlib.util.find_spec("cutlass_library") is None:
        pytest.skip("needs the nvidia-cutlass wheel's headers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, EMU_BUILD_DIR=str(tmp_path), NVCC=_nvcc())
    out = subprocess.run([os.path.join(root, "tools", "sm90_check", "run.sh")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0 and "PASSED" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]
