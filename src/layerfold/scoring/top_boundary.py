"""The top boundary read as Hugging Face's ``hidden_states[-1]``: the final-norm output.

layerfold's boundaries are the pre-norm residual stream, the state leaving the last layer included.
Released code that reads ``output_hidden_states`` gets the *final-norm* output as its last entry, so
its score of a window ending at the last layer compares a different space; the parity modes of
LLM-Streamline (``method.top_boundary=final_norm``) and CoMe read that state instead. CoMe streams it
inside its own capture (:mod:`layerfold.capture.channels`); this measures the one score LLM-Streamline needs.
"""

from __future__ import annotations

import torch
from torch import nn

from layerfold.capture.hooks import hidden_into, iterate_batches
from layerfold.models.adapters import get_adapter


@torch.no_grad()
def final_norm_cosine(model: nn.Module, blocks: torch.Tensor, start: int, batch_size: int = 4) -> float:
    """Mean token cosine between the state entering layer ``start`` and the model's final-norm output,
    over every token of ``blocks`` ``[n, seq]`` (float32 per token, summed in float64)."""
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    if not 0 <= start < len(layers):
        raise ValueError(f"Layer {start} does not exist; the model has {len(layers)} layers.")
    entering: list[torch.Tensor] = []
    leaving: list[torch.Tensor] = []
    handles = [
        layers[start].register_forward_pre_hook(lambda module, args, kwargs: entering.append(hidden_into(args, kwargs)), with_kwargs=True),
        model.get_submodule(adapter.final_norm).register_forward_hook(lambda module, args, output: leaving.append(output)),
    ]
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    device = next(model.parameters()).device
    try:
        for batch in iterate_batches(blocks, batch_size, device, None):
            entering.clear()
            leaving.clear()
            model(input_ids=batch, use_cache=False)
            cos = torch.nn.functional.cosine_similarity(entering[0].float(), leaving[-1].float(), dim=-1)
            total += cos.double().sum().cpu()
            tokens += cos.numel()
    finally:
        for handle in handles:
            handle.remove()
    return float(total / max(tokens, 1))
