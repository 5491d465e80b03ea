"""In-place structural edits of decoder stacks: remove, merge and replace layers."""

from layerfold.surgery.remove import LayerSurgeryError, reindex_layers, remove_layers

__all__ = ["LayerSurgeryError", "reindex_layers", "remove_layers"]
