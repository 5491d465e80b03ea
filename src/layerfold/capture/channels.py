"""Streaming per-channel and per-layer statistics for CoMe, from hooks on an unmodified model.

The released CoMe code patches each architecture's modeling file to return, for every layer, the full
``[batch, seq, intermediate]`` FFN activations and ``[batch, seq, heads, head_dim]`` head outputs,
and concatenates them over the calibration set. Here forward-pre-hooks on the adapter's
``mlp_output`` (``down_proj``/``fc2``) and ``attn_output`` (``o_proj``/``out_proj``) add ``sum_t |x_c|``
per input channel into one vector per layer, and forward hooks on the decoder layers accumulate the
layer scores while the forward runs. Memory: the accumulators plus, for the skip score, the last
``window`` boundaries of the current batch (only their last token unless ``skip_tokens="all"``).

Layer scores, as the released ``compute_bi`` (cosine clamped to ``[0, 1]``, NaN read as 0.5):

- ``bi_sum[i]``   = sum over tokens of ``1 - cos(h_i, h_{i+1})``
- ``skip_sum[i]`` = sum of ``arccos(cos(h_i, h_{i+n})) / pi`` over the last token of each sequence
  (CoMe, after Gromov et al.) or over every token (``skip_tokens="all"``, CoMe-P), ``n = window``.

``h_i`` is the residual stream entering layer ``i`` and ``h_L`` the one leaving the last layer, pre-norm
(see :mod:`layerfold.capture.hooks`), with ``top_boundary="pre_norm"``. The released code read HF
``hidden_states``, whose last entry is the final-norm output; ``top_boundary="final_norm"`` reads that
(``h_L`` = the model's final norm applied to the last layer's output), which changes the last layer's
BI and the skip scores of the windows ending at the last layer, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from layerfold.capture.hooks import hidden_from, hidden_into, iterate_batches
from layerfold.models.adapters import get_adapter

SKIP_TOKENS = ("last", "all")
TOP_BOUNDARIES = ("pre_norm", "final_norm")


@dataclass
class ChannelStatistics:
    """Running sums over calibration tokens for one model state (``L`` layers, skip window ``n``)."""

    window: int
    skip_tokens: str
    ffn_abs_sum: list[torch.Tensor] = field(default_factory=list)  # per layer, [intermediate] (float64)
    attn_abs_sum: list[torch.Tensor] = field(default_factory=list)  # per layer, [num_heads * head_dim] (float64)
    bi_sum: torch.Tensor | None = None  # [L] (float64)
    skip_sum: torch.Tensor | None = None  # [L - n + 1] (float64)
    tokens: int = 0
    sequences: int = 0

    @property
    def block_influence(self) -> torch.Tensor:
        """Mean clamped Block Influence per layer, ``[L]``."""
        return self.bi_sum / max(self.tokens, 1)

    @property
    def skip_score(self) -> torch.Tensor:
        """Mean angular distance across every window of ``n`` layers, ``[L - n + 1]`` (index = first layer)."""
        count = self.sequences if self.skip_tokens == "last" else self.tokens
        return self.skip_sum / max(count, 1)


def _clamped_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine in fp32, NaN (zero vectors) read as 0.5 and clamped to ``[0, 1]`` as in the released code."""
    a, b = a.float(), b.float()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return cos.nan_to_num(nan=0.5).clamp(0.0, 1.0)


class _Accumulator:
    """Hooks that add one forward pass's statistics into a :class:`ChannelStatistics`."""

    def __init__(self, model: nn.Module, stats: ChannelStatistics, top_boundary: str = "pre_norm") -> None:
        adapter = get_adapter(model)
        self.layers = adapter.get_layers(model)
        self.adapter = adapter
        self.stats = stats
        # The hidden state leaving the last layer as the scores read it: pre-norm, or through the final norm.
        self.top = model.get_submodule(adapter.final_norm) if top_boundary == "final_norm" else None
        self.recent: dict[int, torch.Tensor] = {}  # boundary index -> states kept for the skip score
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _Accumulator:
        n_layers = len(self.layers)
        device = next(self.layers.parameters()).device
        # Sums stay on the model's device: no host synchronisation inside the forward.
        self.bi = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self.skip = torch.zeros(max(n_layers - self.stats.window + 1, 0), dtype=torch.float64, device=device)
        self.stats.ffn_abs_sum[:] = [None] * n_layers
        self.stats.attn_abs_sum[:] = [None] * n_layers
        for i, layer in enumerate(self.layers):
            for name, sums in ((self.adapter.mlp_output, self.stats.ffn_abs_sum), (self.adapter.attn_output, self.stats.attn_abs_sum)):
                self.handles.append(layer.get_submodule(name).register_forward_pre_hook(self._abs_sum(sums, i)))
            self.handles.append(layer.register_forward_hook(self._boundary(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.recent.clear()
        self.stats.bi_sum = self.bi.cpu()
        self.stats.skip_sum = self.skip.cpu()
        for sums in (self.stats.ffn_abs_sum, self.stats.attn_abs_sum):
            sums[:] = [None if t is None else t.double().cpu() for t in sums]

    @staticmethod
    def _abs_sum(sums: list[torch.Tensor], index: int):
        def hook(module, args):
            x = args[0]
            part = x.detach().abs().float().sum(dim=tuple(range(x.dim() - 1))).double()
            sums[index] = part if sums[index] is None else sums[index] + part

        return hook

    def _keep(self, index: int, hidden: torch.Tensor) -> None:
        # Only what a later window needs: the last token (CoMe) or every token (CoMe-P).
        self.recent[index] = hidden.detach()[:, -1] if self.stats.skip_tokens == "last" else hidden.detach()

    def _boundary(self, index: int):
        n = self.stats.window

        last = len(self.layers) - 1

        def hook(module, args, kwargs, output):
            entering = hidden_into(args, kwargs)
            leaving = hidden_from(output)
            if index == last and self.top is not None:
                leaving = self.top(leaving)
            if index == 0:
                self._keep(0, entering)
            self.bi[index] += (1.0 - _clamped_cos(entering, leaving)).sum().double()
            self._keep(index + 1, leaving)
            start = index + 1 - n
            if start >= 0:
                head = self.recent.pop(start)
                tail = self.recent[index + 1]
                self.skip[start] += (torch.arccos(_clamped_cos(head, tail)) / torch.pi).sum().double()

        return hook


@torch.no_grad()
def capture_channel_statistics(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 4,
    window: int = 2,
    skip_tokens: str = "last",
    desc: str | None = "come scores",
    top_boundary: str = "pre_norm",
) -> ChannelStatistics:
    """One pass over ``blocks`` ``[n, seq]`` accumulating :class:`ChannelStatistics` for the model's current layers
    (``top_boundary``: the state leaving the last layer pre-norm, or after the final norm as HF's ``hidden_states[-1]``)."""
    if skip_tokens not in SKIP_TOKENS:
        raise ValueError(f"skip_tokens must be one of {SKIP_TOKENS}, got {skip_tokens!r}.")
    if top_boundary not in TOP_BOUNDARIES:
        raise ValueError(f"top_boundary must be one of {TOP_BOUNDARIES}, got {top_boundary!r}.")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}.")
    device = next(model.parameters()).device
    stats = ChannelStatistics(window=window, skip_tokens=skip_tokens)
    with _Accumulator(model, stats, top_boundary):
        for batch in iterate_batches(blocks, batch_size, device, desc):
            model(input_ids=batch, use_cache=False)
            stats.tokens += batch.numel()
            stats.sequences += batch.shape[0]
    return stats
