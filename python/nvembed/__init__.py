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


def _map_training_in_checkout() -> None:
    """The training stack is the repository's training/ folder. A wheel installs it as nvembed/training
    (setup.py package_dir); in a source checkout (the PYTHONPATH dev loop, an editable install) there is no such
    folder, so resolve `import nvembed.training` to <repo>/training with a finder consulted last, i.e. only when
    nothing else finds the package. A symlink or a copy would break on Windows checkouts and let the two drift."""
    import importlib.abc
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    src = os.path.join(repo, "training")
    if (os.path.isdir(os.path.join(here, "training")) or os.path.basename(os.path.dirname(here)) != "python"
            or not os.path.isfile(os.path.join(src, "__init__.py"))):
        return  # an installed wheel, or not our checkout layout
    fullname = __name__ + ".training"

    class TrainingFinder(importlib.abc.MetaPathFinder):
        location = src

        def find_spec(self, name, path=None, target=None):
            if name != fullname:
                return None
            return importlib.util.spec_from_file_location(name, os.path.join(src, "__init__.py"),
                                                          submodule_search_locations=[src])

    # importlib.reload(nvembed) runs this again: keep a single finder
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "TrainingFinder"
                        or getattr(f, "location", None) != src]
    sys.meta_path.append(TrainingFinder())


_map_training_in_checkout()


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nvembed' has no attribute {name!r}")
