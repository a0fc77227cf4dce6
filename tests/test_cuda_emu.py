"""The CUDA kernels, run on the CPU: tools/cuda_emu builds the kernel bodies with g++ (one std::thread per
CUDA thread, emulated ldmatrix / mma.sync / cp.async) and checks them against float64 references:
  * infonce (tools/infonce_emu, csrc/cuda/infonce_tc.cuh): loss, lse and both gradients on awkward shapes, forced
    splits and chunked launches;
  * flash (tools/flash_emu, csrc/cuda/flash_sm80.cuh): attention output, lse, dQ, dK, dV for head dims 32/64/128,
    bf16/fp16, GQA/MQA, tails, varlen with empty sequences, sequences without keys (output 0, lse +inf), negative
    scale; outputs start as NaN so an unwritten element fails;
  * latent_pool (tools/latent_pool_emu, csrc/cuda/latent_pool.cu): the fused GEGLU + masked-mean stage, forward and
    backward, fp32 / bf16 / fp16, vector and scalar paths, units of 1..64 tokens, rows without tokens, more columns
    than one CTA, rows of u outside every unit untouched; LayerNorm rows with a gather / a residual (d = 1 .. 1000);
    softmax rows (n = 1 .. 512, partial last CTA, with and without the fp32 copy).
infonce and latent_pool also run built with UBSan (tools/cuda_emu/run.sh, EMU_SANITIZE=1).
Needs g++ (C++20), the CUDA toolkit headers and the nvidia-cutlass wheel; no GPU."""
import glob
import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _have_toolchain():
    if shutil.which(os.environ.get("CXX", "g++")) is None or importlib.util.find_spec("cutlass_library") is None:
        return False
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"] + glob.glob("/usr/local/cuda-*")
    return any(h and os.path.isfile(os.path.join(h, "include", "cuda_runtime_api.h")) for h in homes)


@pytest.mark.slow
@pytest.mark.skipif(not _have_toolchain(), reason="needs g++, the CUDA headers and the nvidia-cutlass wheel")
@pytest.mark.parametrize("kernels", ["infonce", "flash", "latent_pool", "infonce-ubsan", "latent_pool-ubsan"])
def test_tensor_core_kernels_emulated(kernels, tmp_path):
    # -ubsan: built with UBSan's alignment / null / bounds checks (EMU_SANITIZE=1), so a vector load at an address a
    # GPU would fault on stops the run (x86 itself tolerates it)
    kernels, sanitize = kernels.removesuffix("-ubsan"), kernels.endswith("-ubsan")
    env = dict(os.environ, EMU_BUILD_DIR=str(tmp_path), EMU_SANITIZE="1" if sanitize else "0")
    out = subprocess.run([os.path.join(ROOT, "tools", "cuda_emu", "run.sh"), kernels], env=env, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0 and "PASSED" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]
