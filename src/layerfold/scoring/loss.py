"""Scores over model outputs: LaCo's acceptance score over final representations.

The losses themselves (next-token NLL, the loss without each candidate layer, final representations) are
measurements the layer-major runner also makes, so they live below scoring in :mod:`layerfold.execution.loss`;
they are re-exported here under their old names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layerfold.execution.loss import calibration_nll, final_representations, removal_nll, removal_order, token_nll

__all__ = ["calibration_nll", "final_representations", "removal_nll", "removal_order", "representation_similarity", "token_nll"]


def representation_similarity(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """LaCo's acceptance score: mean over sentences of cos(flatten(H_ref), flatten(H_cand)), one cosine per sentence."""
    sims = [F.cosine_similarity(r.flatten(), c.flatten(), dim=0).item() for r, c in zip(reference, candidate)]
    return sum(sims) / len(sims)
