"""In-place structural edits of decoder stacks: remove, merge and undo trial edits."""

from layerfold.surgery.merge import merge_weights, mergeable, rdsc_code, rdsc_paper, weighted
from layerfold.surgery.plan import LayerPlan
from layerfold.surgery.remove import LayerSurgeryError, reindex_layers, remove_layers
from layerfold.surgery.snapshot import StackSnapshot

__all__ = [
    "LayerPlan", "LayerSurgeryError", "StackSnapshot", "merge_weights", "mergeable", "rdsc_code", "rdsc_paper",
    "reindex_layers", "remove_layers", "weighted",
]
