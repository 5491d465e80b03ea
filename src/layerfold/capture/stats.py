"""Streaming statistics over layer boundaries: everything the scoring functions need, in O(L^2) memory."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from layerfold.capture.hooks import LayerBoundaries, iterate_batches


@dataclass
class BoundaryStatistics:
    """Running sums over calibration tokens for ``B = L + 1`` layer boundaries.

    - ``cosine_sum[i, j]``: sum over all tokens of cos(h_i, h_j)  (BI, windowed cosine)
    - ``last_angular_sum[i, j]``: sum over sequences of arccos(cos(h_i, h_j))/pi on the last token (Gromov)
    - ``sample_features[i]``: per-sequence mean of h_i over tokens after the first (MKA manifolds); the
      first position is skipped because BOS/attention-sink tokens carry outlier norms that would dominate.
    """

    num_boundaries: int
    cosine_sum: torch.Tensor = field(init=False)
    last_angular_sum: torch.Tensor = field(init=False)
    tokens: int = 0
    sequences: int = 0
    features: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        b = self.num_boundaries
        self.cosine_sum = torch.zeros(b, b, dtype=torch.float64)
        self.last_angular_sum = torch.zeros(b, b, dtype=torch.float64)

    def update(self, boundaries: torch.Tensor) -> None:
        """Add one batch of boundaries ``[batch, seq, L + 1, hidden]``."""
        unit = F.normalize(boundaries.float(), dim=-1)
        flat = unit.flatten(0, 1)  # [tokens, B, hidden]
        batch_cosine = torch.einsum("nid,njd->ij", flat, flat)
        _require_finite(batch_cosine)
        self.cosine_sum += batch_cosine.double().cpu()
        last = unit[:, -1]  # [batch, B, hidden]
        cos = torch.einsum("bid,bjd->bij", last, last).clamp(-1.0, 1.0)
        self.last_angular_sum += (torch.arccos(cos) / torch.pi).sum(0).double().cpu()
        self.tokens += flat.shape[0]
        self.sequences += boundaries.shape[0]
        self.features.append(boundaries[:, 1:].float().mean(dim=1).transpose(0, 1).cpu())  # [B, batch, hidden]

    # Derived views -------------------------------------------------------------------------------
    @property
    def cosine(self) -> torch.Tensor:
        """Mean token cosine between boundaries, ``[L + 1, L + 1]``."""
        return (self.cosine_sum / max(self.tokens, 1)).float()

    @property
    def last_token_angular(self) -> torch.Tensor:
        """Mean last-token angular distance between boundaries, ``[L + 1, L + 1]``."""
        return (self.last_angular_sum / max(self.sequences, 1)).float()

    @property
    def sample_features(self) -> torch.Tensor:
        """``[L + 1, num_sequences, hidden]``."""
        return torch.cat(self.features, dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "cosine_sum": self.cosine_sum,
            "last_angular_sum": self.last_angular_sum,
            "sample_features": self.sample_features,
            "counts": torch.tensor([self.tokens, self.sequences], dtype=torch.long),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> BoundaryStatistics:
        stats = cls(num_boundaries=tensors["cosine_sum"].shape[0])
        stats.cosine_sum = tensors["cosine_sum"].double()
        stats.last_angular_sum = tensors["last_angular_sum"].double()
        stats.tokens, stats.sequences = (int(v) for v in tensors["counts"])
        stats.features = [tensors["sample_features"]]
        return stats


class NonFiniteActivationError(FloatingPointError):
    """A layer produced NaN or inf activations; the message names the layer."""


def _require_finite(cosine: torch.Tensor) -> None:
    """NaN/inf anywhere in a boundary's hidden states turns its self-cosine (the diagonal) non-finite."""
    bad = (~torch.isfinite(cosine.diagonal())).nonzero().flatten().tolist()
    if bad:
        where = "the embeddings" if bad[0] == 0 else f"the output of decoder layer {bad[0] - 1}"
        raise NonFiniteActivationError(
            f"NaN or inf activations first appear in {where} (layer boundary {bad[0]}). The weights are damaged "
            "or the compute dtype overflows: try runtime.dtype=float32, and restore the checkpoint with "
            "`dvc checkout --force artifacts/base` if it was modified."
        )


@torch.no_grad()
def capture_statistics(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, desc: str | None = "capture") -> BoundaryStatistics:
    """One pass over ``blocks`` accumulating :class:`BoundaryStatistics` for the model's current layers."""
    device = next(model.parameters()).device
    with LayerBoundaries(model) as hooks:
        stats = BoundaryStatistics(num_boundaries=len(hooks.layers) + 1)
        for batch in iterate_batches(blocks, batch_size, device, desc):
            model(input_ids=batch, use_cache=False)
            stats.update(hooks.stacked())
    return stats
