"""csrc/cpu/vec_math.h (exp_sum, reduce_max, the bf16 rounding) checked directly, compiled for each ISA this machine
runs: the AVX512 bodies with and without AVX512-BF16 where the CPU has AVX512, AVX2, and baseline x86-64 (the
generic loops). The ops' tests reach these only through softmax results; this catches an error in a vector body or
a tail that the op tolerances could hide (tests/cpp/vec_math_check.cpp)."""
import os
import platform
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def _isas():
    flags = _cpu_flags()
    out = [pytest.param(["-march=x86-64"], id="x86-64")]
    if "avx2" in flags and "fma" in flags:
        out.append(pytest.param(["-march=x86-64-v3"], id="avx2"))
    if "avx512f" in flags:
        out.append(pytest.param(["-march=native", "-mno-avx512bf16"], id="avx512"))
        out.append(pytest.param(["-march=native"], id="native"))
    return out


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None,
                    reason="needs g++ on x86-64")
@pytest.mark.parametrize("flags", _isas())
def test_vec_math(tmp_path, flags):
    exe = tmp_path / "vec_math_check"
    build = subprocess.run(["g++", "-std=c++20", "-O3", *flags, "-I", os.path.join(ROOT, "csrc"),
                            os.path.join(ROOT, "tests", "cpp", "vec_math_check.cpp"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("0 failures"), run.stdout[-3000:]
