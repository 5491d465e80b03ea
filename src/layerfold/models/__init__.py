"""Model sources, architecture adapters and checkpoint I/O."""

from layerfold.models.adapters import ADAPTERS, LayerAdapter, UnsupportedArchitectureError, get_adapter
from layerfold.models.facts import ModelFacts, ModelSourceError, checkpoint_facts, identity, probe
from layerfold.models.sources import (
    check_compatible,
    describe,
    load_checkpoint,
    load_source,
    resolve_device,
    resolve_dtype,
    save_checkpoint,
)

__all__ = [
    "ADAPTERS", "LayerAdapter", "ModelFacts", "ModelSourceError", "UnsupportedArchitectureError", "check_compatible",
    "checkpoint_facts", "describe", "get_adapter", "identity", "load_checkpoint", "load_source", "probe",
    "resolve_device", "resolve_dtype", "save_checkpoint",
]
