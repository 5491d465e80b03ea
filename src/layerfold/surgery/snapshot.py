"""Undo for trial edits: remember the layer stack and the few layers a trial changes, not the model.

LaCo and SLEB try many candidate edits and keep few. Deep-copying the model per trial costs a full
model of memory each time; a snapshot costs references to the layer modules plus clones of the layers
the trial will overwrite in place.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from layerfold.models import layer_config
from layerfold.models.adapters import get_adapter
from layerfold.surgery.remove import reindex_layers


class StackSnapshot:
    def __init__(self, model: PreTrainedModel, changed: Iterable[int] = ()) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self.layers = list(self.adapter.get_layers(model))
        self.config_entries = layer_config.snapshot(model.config)
        self.saved = {i: {k: v.detach().clone() for k, v in self.layers[i].state_dict().items()} for i in changed}

    @torch.no_grad()
    def restore(self) -> None:
        for i, state in self.saved.items():
            self.layers[i].load_state_dict(state)
        self.adapter.set_layers(self.model, nn.ModuleList(self.layers))
        layer_config.restore(self.model.config, self.config_entries)
        reindex_layers(self.model)
