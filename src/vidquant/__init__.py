"""vidquant: post-training quantization for video diffusion transformers (and any nn.Module).

    >>> import vidquant
    >>> stats = vidquant.calibrate(model_or_pipe, forward_loop)     # forward_loop(model) runs your data
    >>> state = vidquant.quantize(model_or_pipe, "tail-aware-hif4", stats, forward_loop=forward_loop)
    >>> vidquant.apply(model_or_pipe, state); state.save("state/")

Pipelines (Wan, CogVideoX, LTX-Video) keep the prompt-based path: ``vidquant.calibrate(pipe)`` runs the bundled
calibration prompts. The stages `generate`, `evaluate` and `report` complete the data flow.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vidquant")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

# The public API, imported on first use so that `import vidquant.formats` stays light.
_API = {
    "calibrate": "vidquant.calib.calibrate",
    "quantize": "vidquant.ptq",
    "apply": "vidquant.state",
    "generate": "vidquant.eval.generate",
    "evaluate": "vidquant.eval.evaluate",
    "report": "vidquant.eval.evaluate",
    "export": "vidquant.export",
    "load_quantized": "vidquant.export",
    "load_state": "vidquant.state",
    "PTQState": "vidquant.state",
    "load_stats": "vidquant.calib.stats",
    "load_recipe": "vidquant.recipes",
    "adapter_for": "vidquant.models",
    "register_adapter": "vidquant.models",
    "register_method": "vidquant.ptq",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'vidquant' has no attribute '{name}'")
