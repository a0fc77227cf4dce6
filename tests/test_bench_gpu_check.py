"""bench/gpu_check.sh and its sanitizer cases, checked where no GPU is: the script parses, every bench script it
calls exists, the compute-sanitizer table (bench/sanitize_cases.py) runs on CPU tensors and sets only variables the
ops read (a misspelled one would be ignored silently and leave its path unchecked on the one GPU run)."""
import glob
import os
import re
import subprocess
import sys

from conftest import ROOT, run_bench

BENCH = os.path.join(ROOT, "bench")


def _variables_read():
    """Every NVEMBED_* name that appears in the ops' sources (C++ / CUDA and the Python face)."""
    names = set()
    for pattern in ("csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh", "nvembed_ext/*.py"):
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            with open(path) as f:
                names.update(re.findall(r"NVEMBED_[A-Z0-9_]+", f.read()))
    return names


def test_gpu_check_parses_and_calls_existing_scripts():
    script = os.path.join(BENCH, "gpu_check.sh")
    out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with open(script) as f:
        called = set(re.findall(r"python3 (bench/[\w/]+\.py)", f.read()))
    assert {"bench/gpu_smoke.py", "bench/sanitize_flash.py", "bench/sanitize_cases.py"} <= called
    missing = sorted(p for p in called if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, missing


def test_sanitizer_cases_cpu():
    out = run_bench("sanitize_cases.py", "--device", "cpu")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sanitizer cases done: 26 infonce, 2 latent_pool on cpu" in out.stdout


def test_sanitizer_cases_set_only_variables_the_ops_read():
    sys.path.insert(0, BENCH)
    try:
        import sanitize_cases
    finally:
        sys.path.remove(BENCH)
    used = {var for env, *_ in sanitize_cases.INFONCE_CASES + sanitize_cases.LATENT_POOL_CASES for var in env}
    assert {"NVEMBED_INFONCE_GRAD", "NVEMBED_INFONCE_ROW_BLOCK", "NVEMBED_LATENT_POOL_KERNELS"} <= used
    unknown = sorted(used - _variables_read())
    assert not unknown, unknown
