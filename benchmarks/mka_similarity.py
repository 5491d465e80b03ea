"""Benchmark: MKA's layer similarity -- cost before/after the batched MI, its scaling, and its noise.

    python benchmarks/mka_similarity.py --out benchmarks/results/cpu_smollm2_mka_similarity.json

On the default model (SmolLM2-135M-Instruct, the dequantised Q4_1 GGUF rounded to bf16 as the base
stage stores it, computed in fp32) with ``--blocks`` calibration windows of the WikiText-2 train
excerpt, it measures:

1. **cost**: one similarity matrix (30 layers x 32 samples) through the per-pair scikit-learn path
   (``mutual_information`` for every pair, as before) and through ``mutual_information_matrix``,
   with a check that both give the same matrix bit for bit;
2. **scaling** of the new path with the number of layers and of samples;
3. **noise**: the default score (normalised MI) on ``--draws`` disjoint draws of 32 samples -- each
   draw's most similar adjacent pair, Spearman correlations between draws -- and averaged over them,
   with the near-ties of the average;
4. **does it predict harm**: the calibration loss after merging each adjacent pair alone
   (``alpha = S``), and Spearman(similarity, -loss) for one draw and for the average.

Only what this script measures goes into the JSON (device, sizes, seconds).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from layerfold.capture import capture_statistics
from layerfold.data.calibration import build_calibration
from layerfold.io import write_json
from layerfold.methods import MethodContext
from layerfold.methods.mka import MKAConfig, averaged_similarity, draw_indices, layer_similarity, near_ties
from layerfold.models import load_source
from layerfold.scoring.loss import calibration_nll
from layerfold.scoring.manifold import layer_embeddings, merge_alpha, mutual_information, mutual_information_matrix
from layerfold.surgery import weighted

REPO = Path(__file__).resolve().parents[1]

SCALING = (
    "one similarity matrix: L diffusion maps, O(N^2 F + N^3) each (numpy), L kNN entropies, and one batched MI matrix "
    "of O((L d)^2 N^2) elementwise work on the device (d = manifold_dim); the per-pair scikit-learn path it replaces "
    "made L^2 d calls of ~5-15 ms fixed overhead each. MKA repeats it after each of num_remove merges (recompute) "
    "and once per draw; capture (one forward over the calibration set) is the other per-step cost."
)


def _seconds(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _adjacent(matrix: np.ndarray) -> np.ndarray:
    return np.array([matrix[t, t + 1] for t in range(matrix.shape[0] - 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=128, help="calibration windows (draws x 32)")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--loss-blocks", type=int, default=16, help="windows for the merge-harm calibration loss")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-sklearn", action="store_true", help="skip the slow per-pair reference timing")
    parser.add_argument("--cache", type=Path, help="keep the captured per-sample features here (.pt) and reuse them")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    model_cfg = OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml")
    model, tokenizer = load_source(model_cfg)
    model = model.to(torch.bfloat16).to(device=device, dtype=torch.float32).eval()  # as the base checkpoint stores it
    data_cfg = OmegaConf.load(REPO / "conf/data/wikitext2.yaml")
    data_cfg.calibration.num_blocks = args.blocks
    blocks, _ = build_calibration(data_cfg.calibration, tokenizer, data_cfg.local_dir)
    if args.cache is not None and args.cache.is_file():
        sample_features, capture_s = torch.load(args.cache), float("nan")
    else:
        stats, capture_s = _seconds(capture_statistics, model, blocks, 8, "capture")
        sample_features = stats.sample_features
        if args.cache is not None:
            torch.save(sample_features, args.cache)
    features = sample_features[1:].double().numpy()  # [L, N, hidden]
    layers, samples = features.shape[:2]
    cfg = MKAConfig()
    result: dict = {
        "device": str(device) if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": model_cfg.name,
        "layers": layers,
        "calibration": {"blocks": samples, "seq_len": int(blocks.shape[1]), "capture_seconds": round(capture_s, 2) if capture_s == capture_s else None},
    }

    # 1. cost of one similarity matrix, 30 layers x 32 samples
    first = features[:, draw_indices(samples, args.draws, 0)[0]]
    embeddings, embed_s = _seconds(layer_embeddings, list(first), sigma=cfg.sigma, alpha=cfg.kernel_alpha, dim=cfg.manifold_dim)
    batched, batched_s = _seconds(mutual_information_matrix, embeddings, cfg.n_neighbors, 0, device)
    cost = {"samples": first.shape[1], "diffusion_maps_seconds": round(embed_s, 3), "mi_matrix_batched_seconds": round(batched_s, 3)}
    _, full_s = _seconds(layer_similarity, first, cfg, device)
    cost["layer_similarity_seconds"] = round(full_s, 3)
    if not args.skip_sklearn:
        reference, reference_s = _seconds(lambda: np.array([[mutual_information(a, b, cfg.n_neighbors) for b in embeddings] for a in embeddings]))
        cost["mi_matrix_sklearn_per_pair_seconds"] = round(reference_s, 3)
        cost["bitwise_equal"] = bool(np.array_equal(reference, batched))
        cost["speedup_mi"] = round(reference_s / batched_s, 1)
    result["cost"] = cost
    print(cost, flush=True)

    # 2. scaling of the batched path
    scaling = []
    for n_layers, n_samples in ((10, 32), (20, 32), (30, 32), (30, 16), (30, 64), (30, 128)):
        if n_samples > samples:
            continue
        sub = features[:n_layers, :n_samples]
        _, seconds = _seconds(layer_similarity, sub, MKAConfig(k_entropy=min(cfg.k_entropy, n_samples - 1)), device)
        scaling.append({"layers": n_layers, "samples": n_samples, "seconds": round(seconds, 3)})
        print(scaling[-1], flush=True)
    result["scaling"] = scaling
    result["scaling_statement"] = SCALING

    # 3. noise between draws, and the average
    averaged = averaged_similarity(features, MKAConfig(draws=args.draws), device)
    adjacent = np.stack([_adjacent(m) for m in averaged["per_draw"]])
    mean, se = _adjacent(averaged["similarity"]), _adjacent(averaged["stderr"])
    whole = _adjacent(layer_similarity(features, cfg, device)["similarity"])
    rho = [spearmanr(adjacent[a], adjacent[b]).statistic for a in range(args.draws) for b in range(a + 1, args.draws)]
    result["noise"] = {
        "draws": args.draws,
        "samples_per_draw": samples // args.draws,
        "winning_pair_per_draw": [[int(t), int(t) + 1] for t in adjacent.argmax(axis=1)],
        "best_margin_per_draw": [round(float(np.sort(a)[-1] - np.sort(a)[-2]), 4) for a in adjacent],
        "spearman_between_draws": [round(float(r), 3) for r in rho],
        "averaged_winning_pair": [int(mean.argmax()), int(mean.argmax()) + 1],
        "averaged_near_ties": near_ties(mean, se, 0.0),
        "all_samples_one_draw_winning_pair": [int(whole.argmax()), int(whole.argmax()) + 1],
        "adjacent_similarity_mean": [round(float(v), 4) for v in mean],
        "adjacent_similarity_stderr": [round(float(v), 4) for v in se],
    }
    print(result["noise"], flush=True)

    # 4. harm of each single merge: calibration loss with alpha = averaged S
    loss_blocks = blocks[: args.loss_blocks]
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
    result["merge_harm"] = {
        "loss_blocks": args.loss_blocks,
        "dense_loss": round(dense_loss, 4),
        "loss_after_merge": [round(float(v), 4) for v in losses],
        "least_harmful_pair": [int(losses.argmin()), int(losses.argmin()) + 1],
        "spearman_similarity_vs_minus_loss_per_draw": [round(float(spearmanr(a, -losses).statistic), 3) for a in adjacent],
        "spearman_similarity_vs_minus_loss_averaged": round(float(spearmanr(mean, -losses).statistic), 3),
        "loss_of_averaged_winner": round(float(losses[mean.argmax()]), 4),
        "loss_of_best_near_tie": round(float(min(losses[t] for t in near_ties(mean, se, 0.0))), 4),
    }
    print(result["merge_harm"], flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
