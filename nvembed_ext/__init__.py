"""Python face of the nvembed kernels.

Importing this package loads the compiled library (which registers every ``torch.ops.nvembed.*`` op), then adds
the fake (meta) kernels and autograd formulas. ``nvembed_ext.reference`` holds the pure-PyTorch specification
each kernel is tested against.
"""
# torch first: the library links against torch's shared libraries, which must be the ones this process uses
import torch

try:
    from ._build_meta import TORCH_VERSION as _BUILT_WITH
except ImportError:  # a build from before the file existed
    _BUILT_WITH = None
if _BUILT_WITH is not None and _BUILT_WITH != torch.__version__:
    raise ImportError(
        f"nvembed_ext: the compiled library was built against torch {_BUILT_WITH}, but this process runs torch "
        f"{torch.__version__}; rebuild it with this torch: `pip install --no-build-isolation .` (or "
        "tools/dev_build.sh in a source checkout)")
try:
    from . import _C  # noqa: F401  (static TORCH_LIBRARY registration happens on load)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "nvembed_ext: the compiled library nvembed_ext/_C is missing or failed to load "
        f"({e}; running torch {torch.__version__}). Build it with `pip install --no-build-isolation .` from the "
        "repository root."
    ) from e

from . import _attention, _autocast, _infonce, _latent_pool  # noqa: E402,F401  (fake kernels, autograd, autocast)


def build_info() -> dict:
    """How the library was built: version, with_cuda, cuda_archs, cpu_isa, cpu_flags, cpu_blas."""
    info = dict(_C.build_info())
    info["torch"] = torch.__version__
    info["built_with_torch"] = _BUILT_WITH
    return info


ops = torch.ops.nvembed

__all__ = ["build_info", "ops"]
