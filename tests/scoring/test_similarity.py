"""Scores that need a pair of boundaries the statistics did not keep say so, naming the fix."""

from __future__ import annotations

import pytest
import torch

from layerfold.capture.stats import BoundaryStatistics
from layerfold.scoring.similarity import block_influence, window_cosine


def test_scores_that_need_a_pair_not_captured_say_so() -> None:
    stats = BoundaryStatistics(6, max_distance=2)
    stats.update(torch.randn(2, 5, 6, 8))
    assert torch.isfinite(window_cosine(stats.cosine, 2)).all()
    assert torch.isfinite(block_influence(stats.cosine)).all()
    with pytest.raises(ValueError, match="max_distance >= 3"):
        window_cosine(stats.cosine, 3)
