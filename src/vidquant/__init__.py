"""vidquant: post-training quantization for video diffusion transformers.

    >>> import vidquant
    >>> state = vidquant.quantize(pipe, "tail-aware-hif4", vidquant.load_stats("stats/"))
    >>> vidquant.apply(pipe, state)
    >>> state.save("state/"); vidquant.load_state("state/")
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vidquant")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

# The public API, imported on first use so that `import vidquant.formats` stays light.
_API = {
    "quantize": "vidquant.ptq",
    "apply": "vidquant.state",
    "load_state": "vidquant.state",
    "PTQState": "vidquant.state",
    "load_stats": "vidquant.calib.stats",
    "load_recipe": "vidquant.recipes",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'vidquant' has no attribute '{name}'")
