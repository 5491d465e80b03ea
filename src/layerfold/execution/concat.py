"""CoMe layer by layer: concatenation merges in a plan, and its channel statistics streamed per layer.

CoMe's merge is not a weighted sum: the merged layer takes the kept heads' rows and the kept FFN
channels of every layer of the window (:func:`layerfold.surgery.concat.concat_merge_layers`). A plan
records it as a :class:`ConcatBuild` (the window's own builds, what was kept from each, how the norms
combine), and :class:`~layerfold.execution.PlannedLayerLoader` rebuilds the layer from the window's
layers whenever the merged layer is asked for: the state dicts are read one window at a time, so the
compressed model still never exists as a whole, and the tensors are those a resident merge writes
(index selections of the same weights; the norms averaged with the same float32 arithmetic).

:func:`channel_statistics` is :func:`layerfold.capture.channels.capture_channel_statistics` for a
layer-major stack: the same running sums (``sum_t |x_c|`` into each layer's attention and FFN output
projections, clamped Block Influence, the skip score across each window of ``n`` layers) taken with
hooks on each layer while it runs over every calibration batch. Sums are added batch after batch in
the resident order, so they agree with the resident pass to float rounding. Memory: the sums, plus
the last ``n`` boundaries' last tokens (CoMe) or all their tokens (CoMe-P, ``skip_tokens="all"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from layerfold.capture.channels import SKIP_TOKENS, ChannelStatistics, _clamped_cos
from layerfold.capture.hooks import hidden_from, hidden_into
from layerfold.execution.layer_major import Activations, LayerMajorRunner
from layerfold.execution.loaders import StateDict
from layerfold.surgery.concat import ConcatChoice, ConcatLayout, concat_merge_layers


@dataclass(frozen=True, eq=False)
class ConcatBuild:
    """A layer built by concatenating parts of the window's layers (each a plan build: an original layer index,
    a linear merge, or another concatenation)."""

    parts: tuple[Any, ...]
    layout: ConcatLayout
    choice: ConcatChoice
    norms: str

    def apply(self, states: Sequence[StateDict]) -> StateDict:
        """The merged layer's state dict from the window's state dicts (in window order)."""
        return concat_merge_layers([StateView(state) for state in states], self.layout, self.choice, self.norms)

    def to_json(self) -> dict:
        """What ``plan.json`` records of it (the kept channels by count: the indices are in no file, the tensors are)."""
        return {"norms": self.norms, **self.choice.summary()}


class StateView:
    """A decoder layer's state dict seen as the layer: ``get_submodule(name).weight`` / ``.bias`` (None when absent)."""

    def __init__(self, state: StateDict) -> None:
        self.state = state

    def get_submodule(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(weight=self.state.get(f"{name}.weight"), bias=self.state.get(f"{name}.bias"))


@torch.no_grad()
def channel_statistics(run: LayerMajorRunner, acts: Activations, window: int, skip_tokens: str) -> ChannelStatistics:
    """:class:`ChannelStatistics` of ``run``'s stack over ``acts`` (boundary 0 of the calibration blocks), one layer at a time."""
    if skip_tokens not in SKIP_TOKENS:
        raise ValueError(f"skip_tokens must be one of {SKIP_TOKENS}, got {skip_tokens!r}.")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}.")
    layers = run.num_layers
    adapter = run.adapter
    stats = ChannelStatistics(window=window, skip_tokens=skip_tokens)
    stats.ffn_abs_sum[:] = [None] * layers
    stats.attn_abs_sum[:] = [None] * layers
    bi = torch.zeros(layers, dtype=torch.float64, device=run.device)
    skip = torch.zeros(max(layers - window + 1, 0), dtype=torch.float64, device=run.device)
    recent: dict[int, dict[int, torch.Tensor]] = {}  # boundary -> batch -> what a later window needs

    def keep(boundary: int, batch: int, hidden: torch.Tensor) -> None:
        recent.setdefault(boundary, {})[batch] = hidden.detach()[:, -1] if skip_tokens == "last" else hidden.detach()
        start = boundary - window
        if start >= 0:
            head = recent[start].pop(batch)
            if not recent[start]:
                del recent[start]
            skip[start] += (torch.arccos(_clamped_cos(head, recent[boundary][batch])) / torch.pi).sum().double()

    def abs_sum(sums: list, index: int):
        def hook(module, args):
            x = args[0]
            part = x.detach().abs().float().sum(dim=tuple(range(x.dim() - 1))).double()
            sums[index] = part if sums[index] is None else sums[index] + part

        return hook

    def hooks(index: int, layer: nn.Module) -> list:
        def influence(module, args, kwargs, output):
            bi[index] += (1.0 - _clamped_cos(hidden_into(args, kwargs), hidden_from(output))).sum().double()

        return [layer.get_submodule(adapter.mlp_output).register_forward_pre_hook(abs_sum(stats.ffn_abs_sum, index)),
                layer.get_submodule(adapter.attn_output).register_forward_pre_hook(abs_sum(stats.attn_abs_sum, index)),
                layer.register_forward_hook(influence, with_kwargs=True)]

    run.run_layers(acts, on_boundary=keep, on_layer=hooks)
    stats.bi_sum, stats.skip_sum = bi.cpu(), skip.cpu()
    for sums in (stats.ffn_abs_sum, stats.attn_abs_sum):
        sums[:] = [None if t is None else t.double().cpu() for t in sums]
    stats.tokens = sum(ids.numel() for ids in acts.input_ids)
    stats.sequences = sum(ids.shape[0] for ids in acts.input_ids)
    return stats
