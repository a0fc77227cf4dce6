"""nvembed: NV-Embed on hand-written kernels (torch.ops.nvembed.*)."""
import nvembed_ext  # noqa: F401  (loads and registers the ops)
from nvembed_ext import build_info

from . import functional
from .layers import LatentAttentionPooling

__version__ = "0.1.0"
__all__ = ["CachedInfoNCE", "InfoNCELoss", "LatentAttentionPooling", "NVEmbedMTEB", "NVEmbedModel", "build_info",
           "functional", "load", "to_sentence_transformer"]

# The model layer needs transformers (requirements-model.txt), the sentence-transformers wrapper
# sentence-transformers; import them on first use so the kernels alone don't. The MTEB wrapper never imports mteb.
# The training losses (torch.distributed) load on first use too.
_LAZY = {"NVEmbedModel": ".model", "load": ".hub", "to_sentence_transformer": ".st",
         "NVEmbedMTEB": ".mteb_wrapper", "InfoNCELoss": ".losses", "CachedInfoNCE": ".losses"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nvembed' has no attribute {name!r}")
