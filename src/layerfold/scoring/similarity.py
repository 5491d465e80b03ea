"""Layer-importance metrics over boundary statistics: pure functions of small matrices.

Boundary ``i`` is the residual stream entering layer ``i``; boundary ``L`` leaves the last layer
(pre-norm). A block of ``n`` layers starting at ``l`` maps boundary ``l`` to boundary ``l + n``.
"""

from __future__ import annotations

import torch


def block_influence(cosine: torch.Tensor) -> torch.Tensor:
    """ShortGPT Block Influence per layer: ``BI_i = 1 - E_t[cos(h_i, h_{i+1})]``, shape ``[L]``."""
    _check_block(cosine, 1)
    return 1.0 - torch.diagonal(cosine, offset=1)


def window_cosine(cosine: torch.Tensor, n: int) -> torch.Tensor:
    """Mean token cosine between the input and output of every block of ``n`` layers, ``[L - n + 1]``.

    LLM-Streamline maps it to ``0.5 + 0.5 cos`` before averaging; that affine map keeps the argmax.
    """
    _check_block(cosine, n)
    return torch.diagonal(cosine, offset=n)


def angular_distance(cos: torch.Tensor) -> torch.Tensor:
    """``arccos(cos) / pi`` in ``[0, 1]`` (Gromov et al.), clamped against rounding past +-1."""
    return torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi


def block_angular_distance(last_token_angular: torch.Tensor, n: int) -> torch.Tensor:
    """Last-token angular distance between the input and output of every block of ``n`` layers, ``[L - n + 1]``."""
    _check_block(last_token_angular, n)
    return torch.diagonal(last_token_angular, offset=n)


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` smallest scores, ascending by index (ties broken towards later layers)."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), -i))
    return sorted(order[:k])


def _check_block(matrix: torch.Tensor, n: int) -> None:
    layers = matrix.shape[0] - 1
    if not 1 <= n <= layers:
        raise ValueError(f"Block size {n} must be between 1 and the number of layers ({layers}).")
    if torch.isnan(torch.diagonal(matrix, offset=n)).any():
        # Statistics captured with max_distance = d leave the cosine of boundaries more than d apart NaN.
        captured = max((k for k in range(layers + 1) if not torch.isnan(torch.diagonal(matrix, offset=k)).any()), default=0)
        raise ValueError(
            f"Block size {n} needs the cosine of layer boundaries {n} apart, but these statistics hold pairs up to "
            f"{captured} apart (captured with max_distance={captured}): capture with max_distance >= {n}, or None for all pairs."
        )
