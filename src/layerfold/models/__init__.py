"""Model sources, architecture adapters and checkpoint I/O."""

from layerfold.models.adapters import ADAPTERS, LayerAdapter, UnsupportedArchitectureError, get_adapter
from layerfold.models.sources import (
    ModelSourceError,
    describe,
    load_checkpoint,
    load_source,
    resolve_device,
    resolve_dtype,
    save_checkpoint,
)

__all__ = [
    "ADAPTERS", "LayerAdapter", "ModelSourceError", "UnsupportedArchitectureError", "describe", "get_adapter",
    "load_checkpoint", "load_source", "resolve_device", "resolve_dtype", "save_checkpoint",
]
