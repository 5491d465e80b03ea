"""Model-output scores over calibration blocks: LM loss (SLEB, BlockPruner) and final representations (LaCo)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layerfold.capture.hooks import iterate_batches


@torch.no_grad()
def token_nll(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, desc: str | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over ``blocks`` ``[n, seq]`` and the number of predicted tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in iterate_batches(blocks, batch_size, device, desc):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total, count


def calibration_nll(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood of ``model`` over all calibration tokens (SLEB's criterion)."""
    total, count = token_nll(model, blocks, batch_size)
    return total / count


@torch.no_grad()
def final_representations(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Final-norm hidden states ``[seq, hidden]`` per input (what HF's ``hidden_states[-1]`` holds)."""
    device = next(model.parameters()).device
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    return [base(input_ids=ids.view(1, -1).to(device), use_cache=False).last_hidden_state[0].float() for ids in inputs]


def representation_similarity(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """LaCo's acceptance score: mean over sentences of cos(flatten(H_ref), flatten(H_cand)), one cosine per sentence."""
    sims = [F.cosine_similarity(r.flatten(), c.flatten(), dim=0).item() for r, c in zip(reference, candidate)]
    return sum(sims) / len(sims)
