"""Benchmark: MKA's layer similarity -- its cost on the model's device, its scaling, and its noise.

    python benchmarks/mka_similarity.py --checkpoint artifacts/base --device cuda --out benchmarks/results/mka_similarity_h100.json
    python benchmarks/mka_similarity.py --blocks 128 --draws 4 --loss-blocks 4 --threads 1 \
        --out benchmarks/results/cpu_smollm2_mka_similarity_torch.json                                          # CPU, ~5 min
    python benchmarks/mka_similarity.py --blocks 32 --draws 1 --loss-blocks 1 --skip-sklearn --out /tmp/mka.json  # CPU, small

On a checkpoint (default ``artifacts/base``: SmolLM2-135M-Instruct, the dequantised Q4_1 GGUF stored
in bf16; computed in fp32 on CPU and bf16 on CUDA, ``--dtype``) with ``--blocks`` calibration windows
of the WikiText-2 train excerpt, it measures:

1. **cost** of one similarity matrix (all layers x 32 samples) on ``--device``: capture, then the
   diffusion maps and kNN entropies as they were (per layer in numpy / scikit-learn, the reference
   kept below) and as they are (batched torch on the device), alternated, with how far apart they
   are (coordinates after the sign rule; ranks; the final matrix); the batched MI matrix; the
   whole ``layer_similarity``; and, unless ``--skip-sklearn``, the MI matrix through per-pair
   scikit-learn calls with a bitwise comparison;
2. **scaling** of ``layer_similarity`` with the number of layers and of samples;
3. **noise**: the default score on ``--draws`` disjoint draws of 32 samples -- each draw's most
   similar adjacent pair, Spearman correlations between draws -- and averaged, with its near-ties;
4. **does it predict harm**: the calibration loss after merging each adjacent pair alone
   (``alpha = S``), and Spearman(similarity, -loss) for one draw and for the average.

Only what this script measures goes into the JSON.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import Timing, alternate, environment, row, timed, shown, write_result
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from layerfold.capture import capture_statistics
from layerfold.data.calibration import build_calibration
from layerfold.execution.loss import calibration_nll
from layerfold.methods import MethodContext
from layerfold.methods.mka import MKAConfig, averaged_similarity, draw_indices, layer_similarity, near_ties
from layerfold.models import load_checkpoint, resolve_device, resolve_dtype
from layerfold.methods.mka import merge_alpha
from layerfold.scoring.manifold import (
    diffusion_maps,
    knn_entropies,
    layer_embeddings,
    mutual_information,
    mutual_information_matrix,
    rank_normalise,
)
from layerfold.surgery import weighted

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"



SCALING = (
    "one similarity matrix over L layers, N samples, F = hidden features, d = manifold_dim: L Gram matrices O(L N^2 F), "
    "batched kernel algebra, condition numbers and SVDs O(L N^3), kNN entropies O(L N^2 d), and the MI matrix "
    "O((L d)^2 N^2) elementwise -- all batched tensor ops on the device; ranks and the seeded KSG jitter O(L N d log N) "
    "in numpy. MKA repeats it once per draw and, with recompute, after each of num_remove merges, each time after a "
    "capture (one forward over the N T calibration tokens), which is the other per-step cost."
)


# --------------------------------------------------------------------------------------------
# The replaced per-layer numpy / scikit-learn computation (reference for the alternated timing)
# --------------------------------------------------------------------------------------------


def numpy_diffusion_map(features: np.ndarray, sigma: float, alpha: float, dim: int) -> np.ndarray:
    """One layer's diffusion map as it was computed before (numpy, LAPACK's signs), then the sign rule."""
    x = features - features.mean(axis=0, keepdims=True)
    gram = x @ x.T
    sq = np.diag(gram)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0))
    np.fill_diagonal(dist, 0.0)
    dist = 0.5 * (dist + dist.T)
    kernel = np.exp(-np.sqrt(dist / sigma))
    p = kernel.sum(axis=0)
    k1 = kernel / np.outer(p, p) ** alpha
    v = np.sqrt(k1.sum(axis=0))
    a = k1 / np.outer(v, v)
    cond, ridge = np.linalg.cond(a), 1e-6
    for _ in range(10):
        if np.isfinite(cond):
            break
        a = a + np.eye(len(a)) * ridge
        cond, ridge = np.linalg.cond(a), ridge * 10.0
    a = np.nan_to_num(a)
    a[np.abs(a) < 1e-12] = 1e-12
    u = np.linalg.svd(a, full_matrices=False)[0][:, : dim + 1].copy()
    u[:, 0] = np.where(u[:, 0] == 0, 1e-8, u[:, 0])
    psi = (u / u[:, :1])[:, 1 : dim + 1]
    return psi * np.sign(psi[np.argmax(np.abs(psi), axis=0), np.arange(dim)])


def numpy_entropies(embeddings: list[np.ndarray], k: int) -> np.ndarray:
    """kNN entropies as computed before: one scikit-learn NearestNeighbors per layer."""
    from sklearn.neighbors import NearestNeighbors

    out = []
    for y in embeddings:
        n, d = y.shape
        r_k = np.maximum(NearestNeighbors(n_neighbors=k + 1).fit(y).kneighbors(y)[0][:, -1], np.finfo(np.float64).tiny)
        out.append(-np.mean(np.log(k / (n * r_k**d))))
    return np.array(out)


# --------------------------------------------------------------------------------------------


def _seconds(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _adjacent(matrix: np.ndarray) -> np.ndarray:
    return np.array([matrix[t, t + 1] for t in range(matrix.shape[0] - 1)])


def cost(features: torch.Tensor, cfg: MKAConfig, device: torch.device, repeats: int, skip_sklearn: bool) -> tuple[dict, list[dict]]:
    """Section 1: one similarity matrix of ``features`` ``[L, N, hidden]``, by part, before and after the torch port."""
    host = [f.double().numpy() for f in features.cpu()]
    on_device = features.to(device)
    parts = dict(sigma=cfg.sigma, alpha=cfg.kernel_alpha, dim=cfg.manifold_dim)

    def before() -> tuple[list[np.ndarray], np.ndarray]:
        embeddings = [rank_normalise(numpy_diffusion_map(f, **parts)) for f in host]
        return embeddings, numpy_entropies(embeddings, cfg.k_entropy)

    def after() -> tuple[list[np.ndarray], np.ndarray]:
        embeddings = layer_embeddings(list(on_device), **parts, device=device)
        return embeddings, knn_entropies(embeddings, cfg.k_entropy, device)

    (old_embeddings, old_entropy), (new_embeddings, new_entropy) = before(), after()
    old_coordinates = np.stack([numpy_diffusion_map(f, **parts) for f in host])
    new_coordinates = diffusion_maps(list(on_device), **parts, device=device).cpu().numpy()
    timings = alternate({"before": before, "after": after}, device, warmup=1, repeats=repeats)
    timings["mi_matrix"] = timed(lambda: mutual_information_matrix(new_embeddings, cfg.n_neighbors, 0, device), device, repeats=repeats)
    timings["layer_similarity"] = timed(lambda: layer_similarity(on_device, cfg, device), device, repeats=repeats)
    layers, samples = features.shape[:2]
    out = {
        "layers": layers, "samples": samples,
        "embeddings_entropies_before_seconds": round(timings["before"].median, 4),
        "embeddings_entropies_after_seconds": round(timings["after"].median, 4),
        "speedup_embeddings_entropies": round(timings["before"].median / timings["after"].median, 1),
        "mi_matrix_batched_seconds": round(timings["mi_matrix"].median, 4),
        "layer_similarity_seconds": round(timings["layer_similarity"].median, 4),
        "max_coordinate_difference": float(np.abs(old_coordinates - new_coordinates).max()),
        "ranks_identical": all(np.array_equal(a, b) for a, b in zip(old_embeddings, new_embeddings)),
        "max_entropy_relative_difference": float(np.max(np.abs(old_entropy - new_entropy) / np.abs(old_entropy))),
    }
    names = {"before": "diffusion maps + entropies, per layer numpy/sklearn (before)",
             "after": "diffusion maps + entropies, batched torch (after)",
             "mi_matrix": "MI matrix, batched torch", "layer_similarity": "layer_similarity (whole matrix)"}
    rows = [row(f"{names[k]} (L={layers}, N={samples})", timing=t, device=device, layers=layers, samples=samples) for k, t in timings.items()]
    if not skip_sklearn:
        reference, reference_s = _seconds(lambda: np.array([[mutual_information(a, b, cfg.n_neighbors) for b in new_embeddings] for a in new_embeddings]))
        out["mi_matrix_sklearn_per_pair_seconds"] = round(reference_s, 3)
        out["mi_bitwise_equal_to_sklearn"] = bool(np.array_equal(reference, mutual_information_matrix(new_embeddings, cfg.n_neighbors, 0, device)))
    return out, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "artifacts/base", help="checkpoint directory (default artifacts/base)")
    parser.add_argument("--blocks", type=int, help="calibration windows, draws x 32 (default 128 on CUDA, 64 on CPU)")
    parser.add_argument("--draws", type=int, help="disjoint draws of 32 samples (default 4 on CUDA, 2 on CPU)")
    parser.add_argument("--loss-blocks", type=int, help="windows for the merge-harm calibration loss (default 16 on CUDA, 4 on CPU)")
    parser.add_argument("--repeats", type=int, help="timed runs of each part (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 on a shared, oversubscribed CPU)")
    parser.add_argument("--device", default="auto", help="where the model and the whole similarity run (auto: CUDA if present)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--skip-sklearn", action="store_true", help="skip the slow per-pair scikit-learn MI reference")
    parser.add_argument("--cache", type=Path, help="keep the captured per-sample features here (.pt) and reuse them")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/mka_similarity_<device type>.json)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    blocks_n = args.blocks or (128 if on_gpu else 64)
    draws = args.draws or (4 if on_gpu else 2)
    loss_blocks_n = args.loss_blocks or (16 if on_gpu else 4)
    repeats = args.repeats or (10 if on_gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_average = [round(v, 2) for v in os.getloadavg()]  # other work on the host slows small-tensor torch ops most
    torch.manual_seed(0)

    model, tokenizer = load_checkpoint(args.checkpoint, device, dtype)
    data_cfg = OmegaConf.load(REPO / "conf/data/wikitext2.yaml")
    data_cfg.calibration.num_blocks = blocks_n
    blocks, _ = build_calibration(data_cfg.calibration, tokenizer, data_cfg.local_dir)
    capture_s = None
    if args.cache is not None and args.cache.is_file():
        sample_features = torch.load(args.cache)
    else:
        stats, capture_s = _seconds(capture_statistics, model, blocks, 8, "capture")
        sample_features = stats.sample_features
        if args.cache is not None:
            torch.save(sample_features, args.cache)
    features = sample_features[1:]  # [L, N, hidden], as the method hands them over
    layers, samples = features.shape[:2]
    cfg = MKAConfig()
    rows = []
    if capture_s is not None:
        rows.append(row(f"capture ({samples} windows x {blocks.shape[1]} tokens, one run)", timing=Timing([capture_s]),
                        tokens=blocks.numel(), device=device))

    # 1. cost of one similarity matrix, all layers x 32 samples
    first = features[:, torch.from_numpy(draw_indices(samples, draws, 0)[0])]
    cost_result, cost_rows = cost(first, cfg, device, repeats, args.skip_sklearn)
    rows += cost_rows
    print(cost_result, flush=True)

    # 2. scaling of layer_similarity with layers and samples
    scaling = []
    for n_layers, n_samples in ((10, 32), (20, 32), (layers, 32), (layers, 16), (layers, 64), (layers, 128)):
        if n_samples > samples or n_layers > layers:
            continue
        sub = features[:n_layers, :n_samples].to(device)
        sub_cfg = MKAConfig(k_entropy=min(cfg.k_entropy, n_samples - 1))
        timing = timed(lambda: layer_similarity(sub, sub_cfg, device), device, repeats=repeats)
        rows.append(row(f"layer_similarity (L={n_layers}, N={n_samples})", timing=timing, device=device, layers=n_layers, samples=n_samples))
        scaling.append({"layers": n_layers, "samples": n_samples, "seconds": round(timing.median, 4)})
        print(scaling[-1], flush=True)

    # 3. noise between draws, and the average
    averaged = averaged_similarity(features, MKAConfig(draws=draws), device)
    adjacent = np.stack([_adjacent(m) for m in averaged["per_draw"]])
    mean, se = _adjacent(averaged["similarity"]), _adjacent(averaged["stderr"])
    whole = _adjacent(layer_similarity(features, cfg, device)["similarity"])
    rho = [spearmanr(adjacent[a], adjacent[b]).statistic for a in range(draws) for b in range(a + 1, draws)]
    noise = {
        "draws": draws,
        "samples_per_draw": samples // draws,
        "winning_pair_per_draw": [[int(t), int(t) + 1] for t in adjacent.argmax(axis=1)],
        "best_margin_per_draw": [round(float(np.sort(a)[-1] - np.sort(a)[-2]), 4) for a in adjacent],
        "spearman_between_draws": [round(float(r), 3) for r in rho],
        "averaged_winning_pair": [int(mean.argmax()), int(mean.argmax()) + 1],
        "averaged_near_ties": near_ties(mean, se, 0.0),
        "all_samples_one_draw_winning_pair": [int(whole.argmax()), int(whole.argmax()) + 1],
        "adjacent_similarity_mean": [round(float(v), 4) for v in mean],
        "adjacent_similarity_stderr": [round(float(v), 4) for v in se],
    }
    print(noise, flush=True)

    # 4. harm of each single merge: calibration loss with alpha = averaged S
    loss_blocks = blocks[:loss_blocks_n]
    ctx = MethodContext(model, tokenizer, loss_blocks, stats=None, batch_size=8)  # only its in-place trials are used
    dense_loss = calibration_nll(model, loss_blocks, 8)
    losses = []
    for t in range(layers - 1):
        alpha = merge_alpha(averaged["similarity"], t, t + 1)
        with ctx.trial(changed=[t]):
            ctx.merge(t, [t + 1], weighted(alpha))
            losses.append(calibration_nll(model, loss_blocks, 8))
        print("merge", t, t + 1, round(losses[-1], 4), flush=True)
    losses = np.array(losses)
    harm = {
        "loss_blocks": loss_blocks_n,
        "dense_loss": round(dense_loss, 4),
        "loss_after_merge": [round(float(v), 4) for v in losses],
        "least_harmful_pair": [int(losses.argmin()), int(losses.argmin()) + 1],
        "spearman_similarity_vs_minus_loss_per_draw": [round(float(spearmanr(a, -losses).statistic), 3) for a in adjacent],
        "spearman_similarity_vs_minus_loss_averaged": round(float(spearmanr(mean, -losses).statistic), 3),
        "loss_of_averaged_winner": round(float(losses[mean.argmax()]), 4),
        "loss_of_best_near_tie": round(float(min(losses[t] for t in near_ties(mean, se, 0.0))), 4),
    }
    print(harm, flush=True)

    record: dict[str, Any] = {
        "benchmark": "mka_similarity",
        "environment": environment(device),
        "settings": {"checkpoint": shown(args.checkpoint), "dtype": str(dtype).replace("torch.", ""), "layers": layers,
                     "calibration_windows": samples, "seq_len": int(blocks.shape[1]), "draws": draws, "loss_blocks": loss_blocks_n,
                     "repeats": repeats, "threads": torch.get_num_threads(), "load_average_at_start": load_average, "mka": {k: v for k, v in cfg.__dict__.items() if k != "name"}},
        "rows": rows,
        "notes": (f"One similarity matrix ({layers} layers x 32 samples) on {device.type}: diffusion maps + entropies "
                  f"{cost_result['embeddings_entropies_before_seconds']} s as per-layer numpy/sklearn calls (before) vs "
                  f"{cost_result['embeddings_entropies_after_seconds']} s batched torch (after), alternated; ranks identical: "
                  f"{cost_result['ranks_identical']}, largest coordinate difference {cost_result['max_coordinate_difference']:.1e}. "
                  f"Whole layer_similarity {cost_result['layer_similarity_seconds']} s."),
        "cost": cost_result,
        "scaling": scaling,
        "scaling_statement": SCALING,
        "noise": noise,
        "merge_harm": harm,
    }
    write_result(args.out or RESULTS / f"mka_similarity_{device.type}.json", record)


if __name__ == "__main__":
    main()
