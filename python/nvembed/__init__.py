"""nvembed: NV-Embed on hand-written kernels (torch.ops.nvembed.*)."""
import nvembed_ext  # noqa: F401  (loads and registers the ops)
from nvembed_ext import build_info

from . import functional
from .layers import LatentAttentionPooling

__version__ = "0.1.0"
__all__ = ["LatentAttentionPooling", "build_info", "functional"]
