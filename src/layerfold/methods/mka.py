"""MKA, "Pruning via Merging" (Liu et al., EMNLP 2024; arXiv 2406.16330): merge adjacent layers by manifold similarity.

Per step::

    F_l   = outputs of layer l over the calibration samples    (N, hidden), one row per sample
    Y_l   = layer_embeddings(F)                                 diffusion map + rank normalisation
    S     = npib_similarity(Y)                                  (L, L) NPIB, entropy guard `guard`
    S     <- S_ij / sqrt(S_ii S_jj)                             similarity_norm="diagonal" (see below)
    S     averaged over `draws` disjoint subsets of the samples; near-ties flagged
    (l, l+1) = most similar adjacent pair (paper) | the last pair (released code)
               | among near-ties, the merge with the lowest calibration loss (tie_break="loss")
    alpha = S_{l,l+1} (paper) | sigmoid(row-mean ratio) (released code)
    layer l <- alpha theta_l + (1 - alpha) theta_{l+1};  delete layer l+1   (apply_merge=False: only delete)

repeated ``num_remove`` times, over the adjacent pairs whose layers share one structure (every pair, but
in a stack that mixes dense and mixture-of-experts layers). The measurement (manifolds, NPIB similarity) lives in :mod:`layerfold.scoring.manifold`;
the merge decisions (:func:`most_similar_adjacent_pair`, :func:`merge_alpha`) live here; the
weight arithmetic in :func:`layerfold.surgery.weighted` (every linear weight and bias; norms stay
layer ``l``'s). Departures from the released code, each fixing a defect of the released ``pipeline.py`` (SempraETY/Pruning-via-Merging):

- **The merge is written** (the code assigned into a fresh ``state_dict()`` dict, so its "merge"
  was a truncation of the last layers). ``pair="last"`` with ``alpha="code"`` reproduces what the
  code *meant* to do; what it actually outputs, "truncate the last k", is ``apply_merge=False``
  (equal to the ``drop_last`` method).
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

**Normalised NPIB (decision) -- what the score really is.** The paper merges with
``alpha = S_lm`` and calls ``S`` a *normalised* NPIB, but the raw ratio ``MI(i, j) / sqrt(H_i H_j)``
is not bounded by 1: the self-NPIB ``MI(Y_i, Y_i) / |H_i|`` is unbounded and differs from layer to
layer by orders of magnitude on SmolLM2, and adjacent layers of a real model often score above 1, so
``alpha = S_lm`` clamps to 1 and the merge degenerates into "drop layer ``m``". With
``similarity_norm="diagonal"`` (default) the matrix is normalised by its **raw** self-similarities,
``S'_ij = S_ij / sqrt(S_ii S_jj)`` with ``S_ii = MI(Y_i, Y_i) / H_i`` from the same estimators and
entropy guard (:func:`self_similarity`). Under any positive guard the entropy terms then **cancel
exactly**: ``S'_ij = MI_ij / sqrt(MI_ii MI_jj)``, a *normalised mutual information* of the two
layers' rank-normalised diffusion maps (KSG estimates). Nothing of the information-bottleneck
entropy survives, so ``k_entropy`` and ``guard`` do not change the default score at all. The
diagonal is 1, a layer identical to another scores 1, and ``alpha = S'_lm`` is a weight in
``[0, 1]`` that falls as the maps diverge; the estimator can put a pair slightly above 1, which is
kept in the recorded scores and clamped by :func:`merge_alpha`. ``similarity_norm="none"`` keeps
the raw guarded NPIB matrix (diagonal 1), the released code's score.

**Noise (measured, why ``draws`` and near-ties exist).** The kNN estimates over 32 samples are
noisy. On SmolLM2 (``benchmarks/results/cpu_smollm2_mka_similarity_torch.json``: 4 disjoint draws of
32 windows x 256 tokens) the draws picked three different most similar pairs -- (16, 17), (9, 10),
(25, 26), (16, 17) -- with winning margins of 0.023-0.033 against standard errors of 0.02-0.09 per
pair and Spearman 0.32-0.66 between draws; 9 of the 29 adjacent pairs lie within two standard errors
of the best. Against the calibration loss after merging each pair alone, a single draw's score ranks
pairs at Spearman 0.05-0.51, the 4-draw average at 0.33, and the average's winner (16, 17) was also
the least harmful merge. (The same run before the diffusion coordinates' signs were fixed,
``cpu_smollm2_mka_similarity.json``, gave the same winners, near-ties and least harmful merge.)
``draws > 1`` therefore splits the calibration samples into that many disjoint, seeded subsets,
scores each and averages; ``plan.json`` records each draw's winning pair, the
per-pair standard error and the Spearman correlation between draws. Adjacent pairs within
``tie_margin`` plus two standard errors of the best are flagged as near-ties; ``tie_break="loss"``
merges the near-tie whose merge gives the lowest calibration loss (each candidate tried in place
through :meth:`MethodContext.trial`), the functional check the similarity stands in for.
``tie_break="none"`` (default) keeps the paper's rule and only reports the ties; preset
``mka_draws`` turns on 4 draws of 32 windows and the loss tie-break.

**Cost.** ``L`` layers, ``N`` calibration samples of ``T`` tokens, hidden size ``d_h``, ``d =
manifold_dim``. One similarity matrix is ``L`` Gram matrices ``O(L N^2 d_h)``, the kernel algebra,
condition numbers and SVDs of all layers batched, ``O(L N^3)``, kNN entropies ``O(L N^2 d)`` and the
MI matrix ``O((L d)^2 N^2)`` elementwise -- all tensor ops on the model's device
(:mod:`layerfold.scoring.manifold`), replacing ``O(L)`` numpy/scikit-learn calls for the diffusion
maps and entropies and ``O(L^2 d)`` for the MI, which equal them (the MI bit for bit, the rest to
float64 rounding; the tests keep the replaced code). It is computed once per draw and, with
``recompute=True``, again after each of the ``num_remove`` merges, each time after a fresh capture:
one forward over the ``N T`` calibration tokens, by far the larger cost on a CPU. Measured on the
2-core CPU, one thread (``benchmarks/results/cpu_smollm2_mka_similarity_torch.json``, SmolLM2 fp32):
capture of 128 x 256 tokens 106 s; one 30-layer similarity at N = 32 0.18 s (the 30 diffusion
maps and entropies 0.34 s as per-layer numpy/scikit-learn calls -> 0.04 s batched);
``layer_similarity`` 0.019 / 0.052 / 0.18 s for 10 / 20 / 30 layers at N = 32, and 0.033 / 0.18 /
0.74 / 2.97 s for N = 16 / 32 / 64 / 128 at 30 layers -- the ``(L d)^2 N^2`` MI term dominates.

**Released output (``apply_merge=False``).** The released ``pipeline.py`` computes the fused
weights but assigns them into a fresh ``state_dict()`` dict, so nothing is written and its saved
model is the first ``L - k`` layers -- the ``drop_last`` checkpoint. ``apply_merge=False`` scores
and records every step exactly as configured but only deletes layer ``l+1``, reproducing that
output; use it with ``pair="last"`` (``+experiment=mka_code_released``).

**Entropy guard.** ``guard="abs"`` (default) uses ``|H|``: identical to the released code wherever
the code is finite, and it avoids the NaN/negative fusion ratios of MKA issue #4. ``"none"`` is the
raw code behaviour (NaN possible, then :func:`merge_alpha` raises). See :func:`npib_similarity`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from layerfold.config import ConfigError
from layerfold.methods import CaptureReads, MethodCapabilities, MethodContext, check_target, register
from layerfold.models.facts import ModelFacts
from layerfold.scoring.manifold import GUARDS, guarded_entropies, layer_embeddings, mutual_information_matrix, npib_from_parts
from layerfold.surgery import LayerSurgeryError, weighted
from layerfold.surgery.support import Family, structure_kinds, structure_runs

log = logging.getLogger(__name__)

PAIRS = ("most_similar", "last")
ALPHA_MODES = ("paper", "code")
SIMILARITY_NORMS = ("diagonal", "none")
TIE_BREAKS = ("none", "loss")
MIN_SAMPLES = 8  # per draw: below this the kNN statistics have next to no neighbours to count


@dataclass
class MKAConfig:
    name: str = "mka"
    num_remove: int = field(default=8, metadata={"ge": 1, "lt": "num_layers"})  # merges, one layer fewer per merge
    # most_similar (paper) | last (released code: always the last two layers)
    pair: str = field(default="most_similar", metadata={"choices": list(PAIRS)})
    # paper: alpha = S_lm | code: sigmoid of the row-mean ratio (~0.62)
    alpha: str = field(default="paper", metadata={"choices": list(ALPHA_MODES)})
    # diagonal: S_ij / sqrt(S_ii S_jj) = normalised MI (entropies cancel) | none: raw NPIB (released code)
    similarity_norm: str = field(default="diagonal", metadata={"choices": list(SIMILARITY_NORMS)})
    guard: str = field(default="abs", metadata={"choices": list(GUARDS)})  # NPIB entropy guard; none = released (NaN possible)
    sigma: float = field(default=8.0, metadata={"gt": 0})  # diffusion kernel scale sigma_K
    kernel_alpha: float = field(default=0.5, metadata={"ge": 0, "le": 1})  # diffusion density-normalisation exponent
    manifold_dim: int = field(default=2, metadata={"ge": 1})  # diffusion coordinates kept
    n_neighbors: int = field(default=5, metadata={"ge": 1})  # KSG neighbours of the MI estimate; < samples per draw
    # kNN-entropy neighbours; < samples per draw (released code: 50 of 57 prompts). Cancels under the
    # default similarity_norm=diagonal, so it only matters with similarity_norm=none.
    k_entropy: int = field(default=16, metadata={"ge": 1})
    recompute: bool = True  # re-capture the current model before every merge; False: S of the dense model once
    draws: int = field(default=1, metadata={"ge": 1})  # disjoint seeded subsets of the calibration samples, S averaged
    draw_seed: int = field(default=0, metadata={"ge": 0})  # seed of the split into draws
    tie_margin: float = field(default=0.0, metadata={"ge": 0})  # near-tie: S >= best - tie_margin - 2 standard errors
    tie_break: str = field(default="none", metadata={"choices": list(TIE_BREAKS)})  # loss: lowest calibration loss among near-ties
    apply_merge: bool = True  # False: delete layer l+1 only, the released code's actual output (see above)


# --------------------------------------------------------------------------------------------
# Similarity
# --------------------------------------------------------------------------------------------


def self_similarity(
    embeddings: list[np.ndarray],
    n_neighbors: int = 5,
    k_entropy: int = 16,
    guard: str = "abs",
    *,
    eps: float = 1e-6,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Raw self-NPIB ``S_ii = MI(Y_i, Y_i) / |H_i|`` per layer, ``(L,)``.

    Same estimators, entropy guard and defaults as :func:`npib_similarity` (whose guarded diagonal is
    overwritten with 1); under ``guard="none"`` this equals that function's raw diagonal. Not a
    constant: it is unbounded and varies by orders of magnitude between the layers of a real model.
    """
    entropy = guarded_entropies(embeddings, k_entropy, guard, eps, device)
    mi = np.diag(mutual_information_matrix(embeddings, n_neighbors=n_neighbors, seed=seed, device=device))
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


def layer_similarity(features: np.ndarray | torch.Tensor, cfg: MKAConfig, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """MKA similarity of ``L`` layers from their per-sample outputs ``features`` ``[L, N, hidden]``.

    Returns ``similarity`` (the matrix the method uses), ``raw`` (guarded NPIB, diagonal 1) and
    ``self`` (raw self-NPIB per layer; only with ``similarity_norm="diagonal"``). The MI matrix and
    the entropies are estimated once and shared by all three; ``device`` is where the diffusion
    maps, entropies and pairwise MI run, and the result does not depend on it.
    """
    embeddings = layer_embeddings(list(features), sigma=cfg.sigma, alpha=cfg.kernel_alpha, dim=cfg.manifold_dim, device=device)
    entropy = guarded_entropies(embeddings, cfg.k_entropy, cfg.guard, device=device)
    mi = mutual_information_matrix(embeddings, n_neighbors=cfg.n_neighbors, device=device)
    raw = npib_from_parts(mi, entropy, cfg.guard)
    if cfg.similarity_norm == "none":
        return {"similarity": raw, "raw": raw}
    with np.errstate(invalid="ignore", divide="ignore"):
        diag = np.diag(mi) / np.abs(entropy)  # = self_similarity(embeddings, ...)
    return {"similarity": normalise_by_diagonal(raw, diag), "raw": raw, "self": diag}


def draw_indices(samples: int, draws: int, seed: int) -> list[np.ndarray]:
    """``draws`` disjoint, equally sized, seeded subsets of ``range(samples)`` (a remainder is left out)."""
    order = np.random.default_rng(seed).permutation(samples)
    size = samples // draws
    return [np.sort(order[d * size : (d + 1) * size]) for d in range(draws)]


def averaged_similarity(features: np.ndarray | torch.Tensor, cfg: MKAConfig, device: str | torch.device = "cpu") -> dict:
    """:func:`layer_similarity` averaged over ``cfg.draws`` disjoint subsets of the samples.

    Adds ``stderr`` (standard error of the mean per entry; zeros for one draw) and ``per_draw`` (each
    draw's ``similarity`` matrix) to the averaged ``similarity``/``raw``/``self``.
    """
    features = torch.as_tensor(features)
    per_draw = [
        layer_similarity(features[:, torch.from_numpy(idx)], cfg, device)
        for idx in draw_indices(features.shape[1], cfg.draws, cfg.draw_seed)
    ]
    out = {key: np.mean([d[key] for d in per_draw], axis=0) for key in per_draw[0]}
    stack = np.stack([d["similarity"] for d in per_draw])
    out["stderr"] = stack.std(axis=0, ddof=1) / np.sqrt(len(stack)) if len(stack) > 1 else np.zeros_like(stack[0])
    out["per_draw"] = stack
    return out


# --------------------------------------------------------------------------------------------
# Merge decisions: which adjacent pair to merge and with what weight (the measurement is layerfold.scoring.manifold's)
# --------------------------------------------------------------------------------------------


def most_similar_adjacent_pair(similarity: np.ndarray, active: Sequence[int] | None = None) -> tuple[int, int]:
    """The adjacent pair ``(l, m)`` with the highest ``S_lm`` in the current layer order (paper).

    Args:
        similarity: ``(L, L)`` over the original layers (computed once, as MKA does).
        active: original indices of the layers still present, in model order (default
            ``range(L)``); after merging ``m`` into ``l``, drop ``m`` from it.

    Returns:
        ``(active[t], active[t + 1])`` maximising ``S``; ties go to the later pair (the deeper
        layers, which the layer-pruning literature finds most redundant); NaN scores never win.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    order = list(range(similarity.shape[0])) if active is None else list(active)
    if len(order) < 2:
        raise ValueError("need at least two active layers to pick a pair")
    scores = np.array([similarity[a, b] for a, b in zip(order[:-1], order[1:])])
    scores = np.where(np.isnan(scores), -np.inf, scores)
    if np.all(np.isneginf(scores)):
        raise ValueError("no finite similarity between adjacent active layers")
    # Last occurrence of the maximum: scan the reversed scores.
    t = len(scores) - 1 - int(np.argmax(scores[::-1]))
    return order[t], order[t + 1]


def _sigmoid(x: float) -> float:
    """Logistic function without overflow for large ``|x|``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def merge_alpha(similarity: np.ndarray, l: int, m: int, mode: str = "paper", beta: float = 1.0) -> float:
    """Weight ``alpha`` on layer ``l`` in ``theta = alpha theta_l + (1 - alpha) theta_m``.

    - ``"paper"``: ``alpha = S_lm`` clamped to ``[0, 1]`` (the paper's heuristic). NPIB values above
      1 are common for near-identical layers, which gives ``alpha = 1``: keep ``l``, drop ``m``.
    - ``"code"``: the released ``compute_fusion_ratios``: ``s_l, s_m`` = row means of ``S`` (diagonal
      included), ``r = s_l / (s_l + s_m)``, ``alpha = sigmoid(beta r)``. With ``r ~ 0.5`` this is
      ~0.62 whatever the layers.

    Raises:
        ValueError: for an unknown mode or a non-finite ``alpha`` (a NaN weight would corrupt the
            merged layer silently).
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    if mode == "paper":
        alpha = float(np.clip(similarity[l, m], 0.0, 1.0))
    elif mode == "code":
        s_l = float(np.mean(similarity[l, :]))
        s_m = float(np.mean(similarity[m, :]))
        total = s_l + s_m
        ratio = s_l / total if total != 0 else math.nan
        alpha = _sigmoid(beta * ratio) if math.isfinite(ratio) else math.nan
    else:
        raise ValueError(f"mode must be one of {ALPHA_MODES}, got {mode!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"merge weight for layers ({l}, {m}) is not finite (S_lm = {similarity[l, m]})")
    return alpha


def near_ties(scores: np.ndarray, stderr: np.ndarray, margin: float) -> list[int]:
    """Indices of the adjacent pairs whose score lies within ``margin + 2 stderr`` of the best."""
    best = int(np.nanargmax(scores))
    return [t for t in range(len(scores)) if scores[t] >= scores[best] - margin - 2.0 * max(stderr[t], stderr[best])]


# --------------------------------------------------------------------------------------------
# Method
# --------------------------------------------------------------------------------------------


def _check(ctx: MethodContext, cfg: MKAConfig) -> None:
    check_target(ctx, cfg.num_remove)
    check_samples(cfg, int(ctx.calibration.shape[0]))


def check_samples(cfg: MKAConfig, n: int) -> None:
    """The settings against each other and against ``n`` calibration samples (``data.calibration.num_blocks``);
    the ``validate`` stage runs this before anything is deleted, compress again on the data it reads."""
    for key, value, allowed in (
        ("pair", cfg.pair, PAIRS),
        ("alpha", cfg.alpha, ALPHA_MODES),
        ("similarity_norm", cfg.similarity_norm, SIMILARITY_NORMS),
        ("guard", cfg.guard, GUARDS),
        ("tie_break", cfg.tie_break, TIE_BREAKS),
    ):
        if value not in allowed:
            raise ConfigError(f"method.{key} must be one of {list(allowed)}, got '{value}'.")
    if cfg.sigma <= 0:
        raise ConfigError(f"method.sigma must be positive, got {cfg.sigma}.")
    for key in ("manifold_dim", "n_neighbors", "k_entropy", "draws"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"method.{key} must be at least 1, got {getattr(cfg, key)}.")
    per_draw = n // cfg.draws
    if per_draw < max(MIN_SAMPLES, cfg.manifold_dim + 2):
        raise ConfigError(
            f"MKA builds a manifold over calibration samples; data.calibration.num_blocks={n} is too few for "
            f"method.draws={cfg.draws} ({per_draw} per draw, need >= {MIN_SAMPLES}); use >= 32 per draw."
        )
    for key in ("n_neighbors", "k_entropy"):
        k = getattr(cfg, key)
        if k > per_draw - 1:
            raise ConfigError(
                f"method.{key}={k} needs more than {k} samples per draw, but there are {per_draw} "
                f"(data.calibration.num_blocks={n}, method.draws={cfg.draws}); allowed 1..{per_draw - 1}. "
                f"Lower method.{key} or raise data.calibration.num_blocks."
            )


def _features(ctx: MethodContext, step: int) -> torch.Tensor:
    """Per-sample outputs of every current layer, ``[L, N, hidden]`` (boundary 0, the embeddings, dropped).

    Left in the captured dtype: :func:`layer_similarity` moves them to the device in float64.
    """
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
    return features[1:]


def _rounded(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in matrix]


def _round(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def _draw_report(per_draw: np.ndarray, index: list[int]) -> dict:
    """Each draw's winning adjacent pair (positions) and the Spearman correlation between draws."""
    adjacent = per_draw[:, index[:-1], index[1:]]  # (draws, pairs)
    report = {"winning_pair_per_draw": [int(np.nanargmax(a)) for a in adjacent]}
    if len(adjacent) > 1:
        rho = [spearmanr(adjacent[a], adjacent[b]).statistic for a in range(len(adjacent)) for b in range(a + 1, len(adjacent))]
        report["spearman_between_draws"] = [_round(r) for r in rho]
    return report


def _without(similarity: np.ndarray, index: list[int], allowed: np.ndarray) -> np.ndarray:
    """``similarity`` with the adjacent pairs that may not merge set to NaN (never chosen)."""
    if allowed.all():
        return similarity
    masked = np.array(similarity, dtype=np.float64, copy=True)
    for t in np.flatnonzero(~allowed):
        masked[index[t], index[t + 1]] = np.nan
    return masked


def _merge_or_drop(ctx: MethodContext, l: int, alpha: float, apply_merge: bool) -> None:
    if apply_merge:
        ctx.merge(l, [l + 1], weighted(alpha))
    else:
        ctx.remove([l + 1])


def _break_tie(ctx: MethodContext, cfg: MKAConfig, candidates: list[int], alphas: dict[int, float]) -> dict[int, float]:
    """Calibration NLL of the model after each candidate merge, tried in place and undone."""
    losses = {}
    for t in candidates:
        with ctx.trial(changed=[t]):
            _merge_or_drop(ctx, t, alphas[t], cfg.apply_merge)
            losses[t] = ctx.calibration_nll()
    return losses


def problems(cfg: MKAConfig, facts: ModelFacts, params: Any) -> list[str]:
    """Enough calibration samples per draw for the settings (:func:`check_samples`), before anything runs."""
    check_samples(cfg, int(params.data.calibration.num_blocks))
    return []


def family_refusal(family: Family, cfg: MKAConfig) -> str | None:
    """Why this stack cannot take ``num_remove`` merges of adjacent layers of one structure, or None."""
    structures = family.structures
    if structures is None or len(set(structures)) == 1 or not cfg.get("apply_merge", True):
        return None
    possible = sum(run - 1 for run in structure_runs(structures))
    wanted = int(cfg.get("num_remove") or 0)
    if wanted > possible:
        return (f"method=mka merges adjacent pairs of layers weight by weight, and only layers of one structure merge; this "
                f"{family.model_type} model allows at most {possible} such merges ({structure_kinds(family)}), but method.num_remove={wanted}. "
                f"Set method.num_remove <= {possible}, or use a removal method.")
    return None


# Reads the per-sample features of every boundary (the dense model's from the capture, then re-captured per merge).
@register("mka", MKAConfig, capabilities=MethodCapabilities(edit="merge", reads=CaptureReads(("sample_features",)),
                                                            family_refusal=family_refusal), problems=problems)
def mka(ctx: MethodContext, cfg: MKAConfig) -> dict:
    _check(ctx, cfg)
    steps: list[dict] = []
    first: dict = {}
    scoring_seconds = 0.0  # under details["timings"], which the compress stage moves to metrics/compress_time.json
    for step in tqdm(range(cfg.num_remove), desc="MKA merges", unit="merge", disable=None):
        if cfg.recompute or step == 0:
            features = _features(ctx, step)
            tic = time.perf_counter()
            scores = averaged_similarity(features, cfg, ctx.device)
            scoring_seconds += time.perf_counter() - tic
            if step == 0:
                first = scores
        similarity, stderr = scores["similarity"], scores["stderr"]
        # Index into `similarity`: current positions (recompute) or original layers (computed once).
        index = list(range(ctx.num_layers)) if cfg.recompute else [g[0] for g in ctx.plan.groups]
        adjacent = np.array([similarity[a, b] for a, b in zip(index[:-1], index[1:])])
        adjacent_se = np.array([stderr[a, b] for a, b in zip(index[:-1], index[1:])])
        # Only pairs of one structure merge (not a dense layer with a mixture-of-experts one); all pairs of most models.
        allowed = np.array([not cfg.apply_merge or ctx.mergeable([t, t + 1]) for t in range(len(index) - 1)])
        ties = near_ties(np.nan_to_num(np.where(allowed, adjacent, np.nan), nan=-np.inf), adjacent_se, cfg.tie_margin)
        if cfg.pair == "most_similar":
            a, _ = most_similar_adjacent_pair(_without(similarity, index, allowed), active=index)
            l = index.index(a)
        else:
            l = int(np.flatnonzero(allowed)[-1])
        alphas = {t: merge_alpha(similarity, index[t], index[t + 1], mode=cfg.alpha) if cfg.apply_merge else float("nan") for t in set(ties) | {l}}
        losses = {}
        if cfg.tie_break == "loss" and cfg.pair == "most_similar" and len(ties) > 1:
            losses = _break_tie(ctx, cfg, ties, alphas)
            l = min(losses, key=lambda t: (losses[t], -t))
        a, b = index[l], index[l + 1]
        record = {
            "step": step + 1,
            "pair": [l, l + 1],  # positions in the model at this step
            "original_layers": [list(ctx.plan.groups[l]), list(ctx.plan.groups[l + 1])],
            "alpha": float(alphas[l]) if np.isfinite(alphas[l]) else None,  # exact: the weight written
            "similarity": _round(similarity[a, b]),
            "similarity_stderr": _round(stderr[a, b]),
            "raw_similarity": _round(scores["raw"][a, b]),
            "adjacent_similarity": [_round(v) for v in adjacent],
            "near_ties": ties,  # positions t of pairs (t, t+1) within tie_margin + 2 stderr of the best
            "applied": "merge" if cfg.apply_merge else "drop upper layer",
        }
        if losses:
            record["tie_break_loss"] = {str(t): round(v, 6) for t, v in losses.items()}
        if cfg.recompute or step == 0:
            record.update(_draw_report(scores["per_draw"], index))
        _merge_or_drop(ctx, l, alphas[l], cfg.apply_merge)
        record["merged_group"] = list(ctx.plan.groups[l])
        steps.append(record)
        log.info(
            "MKA step %d: %s %d <- %d (original %s), S=%.4f +- %.4f, alpha=%s, near-ties %s",
            step + 1, record["applied"], l, l + 1, record["merged_group"], similarity[a, b], stderr[a, b], record["alpha"], ties,
        )

    details = {
        "settings": {
            "pair": cfg.pair, "alpha": cfg.alpha, "similarity_norm": cfg.similarity_norm, "guard": cfg.guard,
            "recompute": cfg.recompute, "calibration_samples": int(ctx.calibration.shape[0]), "draws": cfg.draws,
            "samples_per_draw": int(ctx.calibration.shape[0]) // cfg.draws, "tie_break": cfg.tie_break,
            "tie_margin": cfg.tie_margin, "apply_merge": cfg.apply_merge,
        },
        "steps": steps,
        "similarity_step0": _rounded(first["similarity"]),
        "similarity_stderr_step0": _rounded(first["stderr"]),
        "raw_similarity_step0": _rounded(first["raw"]),
    }
    if "self" in first:
        details["self_similarity_step0"] = [_round(v) for v in first["self"]]
    # Wall time is no property of the plan: plan.json never holds it (the same merges must write the same
    # bytes, or every compress would re-run everything after it); the compress stage takes it out.
    details["timings"] = {"scoring_seconds": round(scoring_seconds, 3)}
    return details
