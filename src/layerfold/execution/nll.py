"""Next-token NLL from the last layer boundary: final norm and LM head applied in chunks of positions.

A resident forward makes ``[batch, seq, vocab]`` logits per batch (and :func:`layerfold.execution.loss.token_nll`
widens them to fp32). Layer-major execution reaches the last boundary for every sequence at once, so
the head here runs ``chunk_tokens`` positions at a time: for Llama-3's 128,256-token vocabulary a
1,024-token chunk is 0.5 GB of fp32 logits, whatever the number of sequences. The loss is the same
quantity (sum of ``cross_entropy`` over every predicted token), summed in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layerfold.execution.layer_major import Activations


class TokenNLL:
    """An ``on_boundary`` consumer summing next-token NLL at the last boundary ``final_boundary``."""

    def __init__(self, final_norm: nn.Module, lm_head: nn.Module, acts: Activations, final_boundary: int, chunk_tokens: int = 1024) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"hardware.logits_chunk={chunk_tokens} is not allowed: it must be >= 1 (tokens per LM-head chunk).")
        self.final_norm, self.lm_head = final_norm, lm_head
        self.acts = acts
        self.final_boundary = final_boundary
        self.chunk_tokens = chunk_tokens
        self.total: torch.Tensor | None = None  # float64 on the device: no host sync per chunk
        self.count = 0

    @torch.no_grad()
    def __call__(self, boundary: int, batch_id: int, hidden: torch.Tensor) -> None:
        if boundary != self.final_boundary:
            return
        ids = self.acts.input_ids[batch_id]
        states = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # position t predicts token t + 1
        targets = ids[:, 1:].reshape(-1).to(hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device) if self.total is None else self.total
        for start in range(0, states.shape[0], self.chunk_tokens):
            logits = self.lm_head(self.final_norm(states[start : start + self.chunk_tokens])).float()
            total = total + F.cross_entropy(logits, targets[start : start + self.chunk_tokens], reduction="sum").double()
        self.total = total
        self.count += targets.numel()

    @property
    def nll(self) -> float:
        """Summed NLL over every predicted token so far."""
        return 0.0 if self.total is None else float(self.total)
