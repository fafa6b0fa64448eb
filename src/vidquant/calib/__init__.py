"""Calibration: streaming, mergeable activation statistics from the BF16 pipeline."""

from .stats import CalibStats, load_stats

__all__ = ["CalibStats", "load_stats"]
