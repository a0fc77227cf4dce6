"""Build nvembed: setup.py only locates torch / pybind11 / CUTLASS / nvcc and drives CMakeLists.txt with ninja.

Environment knobs:
  NVEMBED_CUDA=0|1      force the CPU-only build (0) or require the CUDA build (1); default: auto.
  NVEMBED_CUDA_ARCHS    CUDA architectures, default "80;90a" (sm_80 and sm_90a for wgmma/TMA).
  NVEMBED_NATIVE_CPU=0  compile the CPU kernels without -march=native (portable binaries).
  MAX_JOBS              parallel compile jobs (default: CPU count).
  NVEMBED_CUDA_OBJECTS  folder of prebuilt csrc/cuda/*.cu objects (tools/pack_cuda_objects.sh) to link instead
                        of compiling the .cu files (no CUTLASS headers needed then).
  NVEMBED_BUILD_DIR     CMake build directory (default build/cmake-<python tag>, kept for incremental builds).
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.realpath(c)
    return None


def _cuda_required() -> bool:
    return os.environ.get("NVEMBED_CUDA", "auto").lower() in ("1", "true", "on", "yes")


def _nvcc_major(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def _cuda_plan(torch):
    """Returns (with_cuda, nvcc, reason)."""
    want = os.environ.get("NVEMBED_CUDA", "auto").lower()
    if want in ("0", "false", "off", "no"):
        return False, None, "NVEMBED_CUDA=0"
    nvcc = _find_nvcc()
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif nvcc is None:
        reason = "nvcc was not found (set CUDA_HOME)"
    else:
        # the library links the CUDA runtime of this nvcc into torch's process: their major versions must agree
        major, torch_major = _nvcc_major(nvcc), int(torch.version.cuda.split(".")[0])
        if major is not None and major != torch_major:
            reason = (f"nvcc {nvcc} is CUDA {major}, torch {torch.__version__} was built with CUDA "
                      f"{torch.version.cuda} (point CUDA_HOME at a CUDA {torch_major} toolkit)")
    if reason is None:
        return True, nvcc, None
    if _cuda_required():
        raise RuntimeError(f"NVEMBED_CUDA={os.environ['NVEMBED_CUDA']} but the CUDA build is impossible: {reason}")
    return False, None, reason


def _cuda_wheel_includes():
    """torch's CUDA headers include cusparse.h / cublas.h, which ship in the nvidia-* wheels."""
    dirs = []
    for p in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(p, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
        for d in sorted(glob.glob(os.path.join(p, "nvidia", "*", "include"))):
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _cutlass_include():
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return d if os.path.isdir(os.path.join(d, "cute")) else None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11
        try:
            import torch
        except ImportError:
            raise RuntimeError(
                "nvembed compiles its kernels against the torch it will run with, so that torch must be installed "
                "first and visible to the build: pip install 'torch>=2.11', then pip install --no-build-isolation . "
                "(an isolated build environment has no torch, or another one)") from None
        import torch.utils.cpp_extension as cpp_ext

        with_cuda, nvcc, reason = _cuda_plan(torch)
        cuda_objects = os.environ.get("NVEMBED_CUDA_OBJECTS") if with_cuda else None
        cutlass = _cutlass_include() if with_cuda else None
        if with_cuda and cutlass is None and not cuda_objects:
            if _cuda_required():
                raise RuntimeError(f"NVEMBED_CUDA={os.environ['NVEMBED_CUDA']} but the nvidia-cutlass wheel "
                                   "(CUTLASS/CuTe headers) is missing")
            with_cuda, reason = False, "the nvidia-cutlass wheel (CUTLASS/CuTe headers) is not installed"
        if with_cuda:
            print(f"nvembed: building CPU + CUDA kernels (nvcc {nvcc}, archs "
                  f"{os.environ.get('NVEMBED_CUDA_ARCHS', '80;90a')})", flush=True)
        else:
            print(f"nvembed: building CPU kernels only ({reason})", flush=True)

        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_dir = os.environ.get("NVEMBED_BUILD_DIR") or os.path.join(
            ROOT, "build", f"cmake-{sys.implementation.cache_tag}-{'cuda' if with_cuda else 'cpu'}")
        os.makedirs(build_dir, exist_ok=True)
        cmake = shutil.which("cmake")
        try:
            import cmake as cmake_pkg  # the PyPI cmake is newer than most system ones

            cmake = os.path.join(cmake_pkg.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            pass
        if cmake is None:
            raise RuntimeError("nvembed: cmake was not found: pip install cmake ninja (requirements-build.txt)")
        args = [
            cmake, ROOT, "-G", "Ninja", f"-DCMAKE_BUILD_TYPE=Release",
            f"-DNVEMBED_VERSION={VERSION}",
            f"-DNVEMBED_TORCH_INCLUDE_DIRS={';'.join(cpp_ext.include_paths())}",
            f"-DNVEMBED_TORCH_LIBRARY_DIR={cpp_ext.library_paths()[0]}",
            f"-DNVEMBED_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DNVEMBED_PYTHON_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-DNVEMBED_PYBIND11_INCLUDE_DIR={pybind11.get_include()}",
            f"-DNVEMBED_OUTPUT_DIR={out_dir}",
            f"-DNVEMBED_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DNVEMBED_NATIVE_CPU={'OFF' if os.environ.get('NVEMBED_NATIVE_CPU') == '0' else 'ON'}",
            f"-DNVEMBED_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if shutil.which("ninja") is None:
            import ninja

            args.append(f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}")
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        if with_cuda:
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DNVEMBED_CUDA_ARCHS={os.environ.get('NVEMBED_CUDA_ARCHS', '80;90a')}",
                f"-DNVEMBED_CUTLASS_INCLUDE_DIR={cutlass or ''}",
                f"-DNVEMBED_CUDA_OBJECTS_DIR={os.path.abspath(cuda_objects) if cuda_objects else ''}",
                f"-DNVEMBED_CUDA_EXTRA_INCLUDE_DIRS={';'.join(_cuda_wheel_includes())}",
            ]
        # CMake answers a changed compiler path (another nvcc wrapper on PATH, say) by deleting its cache and
        # configuring again without the -D values above: start from a fresh cache instead.
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if with_cuda and os.path.exists(cache):
            with open(cache) as f:
                cached = [ln.split("=", 1)[1].strip() for ln in f if ln.startswith("CMAKE_CUDA_COMPILER:")]
            if cached and cached[0] != nvcc:
                os.remove(cache)
        subprocess.check_call(args, cwd=build_dir)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", ".", "--", f"-j{jobs}"], cwd=build_dir)
        # Also place the library in the source tree's nvembed_ext/: Python puts the current directory first on
        # sys.path for `python -m ...` / `python -c ...`, so from the repository root the source package shadows
        # the installed one and must be loadable too.
        built = os.path.join(out_dir, os.path.basename(self.get_ext_fullpath(ext.name)))
        in_tree = os.path.join(ROOT, "nvembed_ext", os.path.basename(built))
        if os.path.abspath(built) != os.path.abspath(in_tree) and os.path.isdir(os.path.dirname(in_tree)):
            shutil.copy2(built, in_tree)
        # Which torch the library was compiled against, beside each copy: nvembed_ext compares it with the running
        # torch before loading the library (a mismatch otherwise surfaces as an undefined C++ symbol, or worse).
        meta = f"# written by setup.py at build time\nTORCH_VERSION = {torch.__version__!r}\n"
        for folder in {os.path.dirname(built), os.path.dirname(in_tree)}:
            if os.path.isdir(folder):
                with open(os.path.join(folder, "_build_meta.py"), "w") as f:
                    f.write(meta)


setup(
    name="nvembed",
    version=VERSION,
    description="NV-Embed with hand-written kernels: non-causal flash attention, fused latent-attention pooling, "
    "tiled InfoNCE",
    # The training stack lives in the repository's training/ folder and installs as nvembed.training (in a source
    # checkout nvembed/__init__.py maps the import there).
    packages=find_packages(where="python") + ["nvembed_ext", "nvembed.training"],
    package_dir={"": "python", "nvembed_ext": "nvembed_ext", "nvembed.training": "training"},
    ext_modules=[CMakeExtension("nvembed_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    entry_points={"console_scripts": ["nvembed=nvembed.cli:main"]},
    zip_safe=False,
)
