"""vidquant: post-training quantization for video diffusion transformers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vidquant")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
