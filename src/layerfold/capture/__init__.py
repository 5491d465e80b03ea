"""Forward hooks on decoder layers and streaming statistics over calibration data."""

from layerfold.capture.hooks import LayerBoundaries, iterate_batches
from layerfold.capture.stats import BoundaryStatistics, capture_statistics

__all__ = ["BoundaryStatistics", "LayerBoundaries", "capture_statistics", "iterate_batches"]
