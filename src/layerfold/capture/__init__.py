"""Forward hooks on decoder layers and streaming statistics over calibration data."""

from layerfold.capture.hooks import LayerBoundaries, iterate_batches
from layerfold.capture.stats import BoundaryStatistics, NonFiniteActivationError, capture_statistics

__all__ = ["BoundaryStatistics", "LayerBoundaries", "NonFiniteActivationError", "capture_statistics", "iterate_batches"]
