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


def _names(patterns):
    """{NVEMBED_* name: files} over the files matching `patterns` (relative to the repository)."""
    names = {}
    for pattern in patterns:
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            if "__pycache__" in path or not os.path.isfile(path):
                continue
            with open(path, errors="replace") as f:
                for name in re.findall(r"NVEMBED_[A-Z0-9_]+", f.read()):
                    names.setdefault(name, set()).add(os.path.relpath(path, ROOT))
    return names


def _variables_read():
    """Every NVEMBED_* name that appears where variables are read: the ops' sources (C++ / CUDA and the Python
    face), the model / training packages, the build and the tools; plus the benchmarks' own two."""
    return set(_names(["csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh", "nvembed_ext/*.py",
                       "python/**/*.py", "training/**/*.py", "setup.py", "CMakeLists.txt", "tools/**/*", ".ci/run"])
               ) | {"NVEMBED_BENCH_CSV", "NVEMBED_COMMIT"}  # bench/conftest.py, bench/common.py


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


def test_benchmarks_tests_and_readme_name_only_variables_that_are_read():
    """A variable the GPU benchmarks set to pick a path (gpu_infonce's variants, the profiles, the CUDA tests) must be
    one the library reads, or the row labelled with that path measures the default one."""
    used = _names(["bench/**/*.py", "bench/*.sh", "tests/*.py", "README.md"])
    used.pop("NVEMBED_INFONCE_", None)  # a prefix: names formed in code (checked above for the sanitizer table)
    unknown = {name: sorted(files) for name, files in used.items() if name not in _variables_read()}
    assert not unknown, unknown
