"""Python face of the nvembed kernels.

Importing this package loads the compiled library (which registers every ``torch.ops.nvembed.*`` op), then adds
the fake (meta) kernels and autograd formulas. ``nvembed_ext.reference`` holds the pure-PyTorch specification
each kernel is tested against.
"""
try:
    from . import _C  # noqa: F401  (static TORCH_LIBRARY registration happens on load)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "nvembed_ext: the compiled library nvembed_ext/_C is missing or failed to load "
        f"({e}). Build it with `pip install --no-build-isolation .` from the repository root."
    ) from e

import torch  # noqa: E402

from . import _attention, _autocast, _infonce, _latent_pool  # noqa: E402,F401  (fake kernels, autograd, autocast)


def build_info() -> dict:
    """How the library was built: version, with_cuda, cuda_archs, cpu_isa, cpu_flags, cpu_blas."""
    info = dict(_C.build_info())
    info["torch"] = torch.__version__
    return info


ops = torch.ops.nvembed

__all__ = ["build_info", "ops"]
