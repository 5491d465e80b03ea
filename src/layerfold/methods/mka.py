"""MKA, "Pruning via Merging" (Liu et al., EMNLP 2024; arXiv 2406.16330): merge adjacent layers by manifold similarity.

Per step::

    F_l   = outputs of layer l over the calibration samples    (N, hidden), one row per sample
    Y_l   = layer_embeddings(F)                                 diffusion map + rank normalisation
    S     = npib_similarity(Y)                                  (L, L) NPIB, entropy guard `guard`
    S     <- S_ij / sqrt(S_ii S_jj)                             similarity_norm="diagonal" (see below)
    (l, l+1) = most similar adjacent pair (paper) | the last pair (released code)
    alpha = S_{l,l+1} (paper) | sigmoid(row-mean ratio) (released code)
    layer l <- alpha theta_l + (1 - alpha) theta_{l+1};  delete layer l+1

repeated ``num_remove`` times. The scoring mechanics live in :mod:`layerfold.scoring.manifold`, the
weight arithmetic in :func:`layerfold.surgery.weighted` (every linear weight and bias; norms stay
layer ``l``'s). Departures from the released code, each fixing a defect of the released ``pipeline.py`` (SempraETY/Pruning-via-Merging):

- **The merge is written** (the code assigned into a fresh ``state_dict()`` dict, so its "merge"
  was a truncation of the last layers). ``pair="last"`` with ``alpha="code"`` reproduces what the
  code *meant* to do; "truncate the last k" is the ``drop_last`` method.
- **Activations** are the *outputs* of each layer (boundaries ``1..L`` of
  :class:`~layerfold.capture.BoundaryStatistics`, pre-norm), one row per calibration sample (the
  per-sample mean over tokens after the first, ``sample_features``), so the diffusion kernel is a
  sample x sample kernel. The released code used layer *inputs* and, through a chunking bug, a
  kernel over the token rows of a single prompt.
- **Calibration** is ``ctx.calibration``, the data stage's train-split text blocks. Never an
  evaluation split: the released code sampled the MMLU *test* split, which leaks into its MMLU score.
- **Re-scoring** (``recompute=True``, default): the statistics of the *current* model are captured
  again before every step (step 0 uses the dense statistics), since a merge changes the activations
  of every layer above it. ``recompute=False`` is the released code's schedule: ``S`` is computed
  once on the dense model and every later step reads it at the *original* indices, each current
  layer represented by the first original layer of its ``ctx.plan`` group (the base layer that
  absorbed the others, which is what the code's in-place index bookkeeping amounts to).

**Normalised NPIB (decision).** The paper merges with ``alpha = S_lm`` and calls ``S`` a
*normalised* NPIB, but the raw ratio ``MI(i, j) / sqrt(H_i H_j)`` is not bounded by 1: the kNN MI of
an embedding with itself is about 2.2 times its (guarded) kNN entropy on 2-D rank-normalised
diffusion maps, and adjacent layers of a real model score 1.0-1.5, so ``alpha = S_lm`` clamps to 1
and the merge degenerates into "drop layer ``m``". With ``similarity_norm="diagonal"`` (default) the
matrix is normalised by its **raw** self-similarities,
``S'_ij = S_ij / sqrt(S_ii S_jj)`` with ``S_ii = MI(Y_i, Y_i) / H_i`` from the same estimators and
entropy guard (:func:`self_similarity`; :func:`npib_similarity` overwrites its guarded diagonal with
1, so the raw one is computed here). This is a cosine-like normalisation: a layer is exactly as
similar to an identical layer as to itself (``S' = 1``), the diagonal is 1, and ``alpha = S'_lm`` is
a weight in ``[0, 1]`` that falls as the layers' manifolds diverge. With a positive entropy guard the
entropies cancel, ``S'_ij = MI_ij / sqrt(MI_ii MI_jj)``; the estimator can put a pair slightly above
1, which is kept in the recorded scores (it still ranks pairs) and clamped by :func:`merge_alpha`.
``similarity_norm="none"`` keeps the raw guarded matrix (diagonal 1), for comparison.

**Entropy guard.** ``guard="abs"`` (default) uses ``|H|``: identical to the released code wherever
the code is finite, and it avoids the NaN/negative fusion ratios of MKA issue #4. ``"none"`` is the
raw code behaviour (NaN possible, then :func:`merge_alpha` raises). See :func:`npib_similarity`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from layerfold.config import ConfigError
from layerfold.methods import MethodContext, check_target, register
from layerfold.scoring.manifold import (
    ALPHA_MODES,
    GUARDS,
    knn_entropy,
    layer_embeddings,
    merge_alpha,
    most_similar_adjacent_pair,
    mutual_information,
    npib_similarity,
)
from layerfold.surgery import LayerSurgeryError, weighted

log = logging.getLogger(__name__)

PAIRS = ("most_similar", "last")
SIMILARITY_NORMS = ("diagonal", "none")
MIN_SAMPLES = 8  # below this the kNN statistics (k_entropy, n_neighbors) are clamped to near nothing


@dataclass
class MKAConfig:
    name: str = "mka"
    num_remove: int = 8  # merges, one layer fewer per merge
    pair: str = "most_similar"  # most_similar (paper) | last (released code: always the last two layers)
    alpha: str = "paper"  # paper: alpha = S_lm | code: sigmoid of the row-mean ratio (~0.62)
    similarity_norm: str = "diagonal"  # diagonal: S_ij / sqrt(S_ii S_jj) with the raw self-NPIB | none: raw NPIB
    guard: str = "abs"  # NPIB entropy guard: abs | shift | none (released code, NaN possible)
    sigma: float = 8.0  # diffusion kernel scale sigma_K
    kernel_alpha: float = 0.5  # diffusion density-normalisation exponent
    manifold_dim: int = 2  # diffusion coordinates kept
    n_neighbors: int = 5  # KSG neighbours of the MI estimate
    k_entropy: int = 50  # neighbours of the kNN entropy (clamped to N - 1)
    recompute: bool = True  # re-capture the current model before every merge; False: S of the dense model once


# --------------------------------------------------------------------------------------------
# Similarity
# --------------------------------------------------------------------------------------------


def self_similarity(
    embeddings: list[np.ndarray],
    n_neighbors: int = 5,
    k_entropy: int = 50,
    guard: str = "abs",
    *,
    eps: float = 1e-6,
    seed: int = 0,
) -> np.ndarray:
    """Raw self-NPIB ``S_ii = MI(Y_i, Y_i) / sqrt(H_i H_i)`` per layer, ``(L,)``.

    Same estimators, entropy guard and defaults as :func:`npib_similarity` (whose guarded diagonal is
    overwritten with 1); under ``guard="none"`` this equals that function's raw diagonal.
    """
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")
    entropy = np.array([knn_entropy(e, k=k_entropy) for e in embeddings])
    if guard == "abs":
        entropy = np.maximum(np.abs(entropy), eps)
    elif guard == "shift":
        entropy = entropy - entropy.min() + eps
    mi = np.array([mutual_information(e, e, n_neighbors=n_neighbors, seed=seed) for e in embeddings])
    with np.errstate(invalid="ignore", divide="ignore"):
        return mi / np.abs(entropy)


def normalise_by_diagonal(similarity: np.ndarray, diagonal: np.ndarray) -> np.ndarray:
    """``S_ij / sqrt(d_i d_j)`` with the diagonal set to exactly 1 (NaN kept where ``d`` is not positive)."""
    diagonal = np.asarray(diagonal, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.sqrt(np.outer(diagonal, diagonal))
        out = np.where(scale > 0, np.asarray(similarity, dtype=np.float64) / scale, np.nan)
    np.fill_diagonal(out, 1.0)
    return out


def layer_similarity(features, cfg: MKAConfig) -> dict[str, np.ndarray]:
    """MKA similarity of ``L`` layers from their per-sample outputs ``features`` ``[L, N, hidden]``.

    Returns ``similarity`` (the matrix the method uses), ``raw`` (guarded NPIB, diagonal 1) and
    ``self`` (raw self-NPIB per layer; only with ``similarity_norm="diagonal"``).
    """
    embeddings = layer_embeddings(list(features), sigma=cfg.sigma, alpha=cfg.kernel_alpha, dim=cfg.manifold_dim)
    raw = npib_similarity(embeddings, n_neighbors=cfg.n_neighbors, k_entropy=cfg.k_entropy, guard=cfg.guard)
    if cfg.similarity_norm == "none":
        return {"similarity": raw, "raw": raw}
    diag = self_similarity(embeddings, n_neighbors=cfg.n_neighbors, k_entropy=cfg.k_entropy, guard=cfg.guard)
    return {"similarity": normalise_by_diagonal(raw, diag), "raw": raw, "self": diag}


# --------------------------------------------------------------------------------------------
# Method
# --------------------------------------------------------------------------------------------


def _check(ctx: MethodContext, cfg: MKAConfig) -> None:
    check_target(ctx, cfg.num_remove)
    for key, value, allowed in (
        ("pair", cfg.pair, PAIRS),
        ("alpha", cfg.alpha, ALPHA_MODES),
        ("similarity_norm", cfg.similarity_norm, SIMILARITY_NORMS),
        ("guard", cfg.guard, GUARDS),
    ):
        if value not in allowed:
            raise ConfigError(f"method.{key} must be one of {list(allowed)}, got '{value}'.")
    if cfg.sigma <= 0:
        raise ConfigError(f"method.sigma must be positive, got {cfg.sigma}.")
    for key in ("manifold_dim", "n_neighbors", "k_entropy"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"method.{key} must be at least 1, got {getattr(cfg, key)}.")
    n = int(ctx.calibration.shape[0])
    if n < max(MIN_SAMPLES, cfg.manifold_dim + 2):
        raise ConfigError(
            f"MKA builds a manifold over calibration samples; data.calibration.num_blocks={n} is too few, use >= 32."
        )


def _features(ctx: MethodContext, step: int) -> np.ndarray:
    """Per-sample outputs of every current layer, ``[L, N, hidden]`` (boundary 0, the embeddings, dropped)."""
    stats = ctx.dense_stats() if step == 0 else ctx.capture(f"mka step {step + 1}")
    features = stats.sample_features
    if features.shape[0] != ctx.num_layers + 1:
        raise LayerSurgeryError(
            f"The statistics cover {features.shape[0] - 1} layers but the model has {ctx.num_layers}; "
            "capture them from the model being compressed."
        )
    if features.shape[1] < MIN_SAMPLES:
        raise ConfigError(
            f"MKA builds a manifold over calibration samples; the statistics hold {features.shape[1]} samples, "
            "too few; raise data.calibration.num_blocks (use >= 32)."
        )
    return features[1:].double().numpy()


def _rounded(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in matrix]


@register("mka", MKAConfig)
def mka(ctx: MethodContext, cfg: MKAConfig) -> dict:
    _check(ctx, cfg)
    start = time.perf_counter()
    steps: list[dict] = []
    first: dict[str, np.ndarray] = {}
    for step in range(cfg.num_remove):
        if cfg.recompute or step == 0:
            scores = layer_similarity(_features(ctx, step), cfg)
            if step == 0:
                first = scores
        similarity = scores["similarity"]
        # Index into `similarity`: current positions (recompute) or original layers (computed once).
        index = list(range(ctx.num_layers)) if cfg.recompute else [g[0] for g in ctx.plan.groups]
        if cfg.pair == "most_similar":
            a, b = most_similar_adjacent_pair(similarity, active=index)
        else:
            a, b = index[-2], index[-1]
        l = index.index(a)
        alpha = merge_alpha(similarity, a, b, mode=cfg.alpha)
        record = {
            "step": step + 1,
            "pair": [l, l + 1],  # positions in the model at this step
            "original_layers": [list(ctx.plan.groups[l]), list(ctx.plan.groups[l + 1])],
            "alpha": alpha,
            "similarity": round(float(similarity[a, b]), 6),
            "raw_similarity": round(float(scores["raw"][a, b]), 6),
            "adjacent_similarity": [round(float(similarity[x, y]), 6) for x, y in zip(index[:-1], index[1:])],
        }
        ctx.merge(l, [l + 1], weighted(alpha))
        record["merged_group"] = list(ctx.plan.groups[l])
        steps.append(record)
        log.info(
            "MKA step %d: merge %d <- %d (original %s), S=%.4f, alpha=%.4f",
            step + 1, l, l + 1, record["merged_group"], record["similarity"], alpha,
        )

    details = {
        "settings": {
            "pair": cfg.pair, "alpha": cfg.alpha, "similarity_norm": cfg.similarity_norm, "guard": cfg.guard,
            "recompute": cfg.recompute, "calibration_samples": int(ctx.calibration.shape[0]),
        },
        "steps": steps,
        "similarity_step0": _rounded(first["similarity"]),
        "raw_similarity_step0": _rounded(first["raw"]),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if "self" in first:
        details["self_similarity_step0"] = [round(float(v), 6) for v in first["self"]]
    return details
