"""Benchmark: capture statistics against a plain forward over the same tokens, time and peak GPU memory.

    python benchmarks/capture_speed.py                                      # CUDA: llama2-7b and llama3-8b, 32x2048 tokens each
    python benchmarks/capture_speed.py --shape llama2-7b --tokens 128x2048  # one shape, the full calibration set (about 6 min)
    python benchmarks/capture_speed.py --shape tiny --tokens 4x64           # CPU smoke run (the CPU default)

Per shape, a randomly initialised model of a paper-scale configuration (``benchmarks/common.SHAPES``)
is built directly on the device in ``--dtype`` (bf16 by default): real time and memory, no accuracy.
In one process, timed round-robin (``common.alternate``) over the same random token blocks:

- ``plain bN``: ``model(input_ids, use_cache=False, logits_to_keep=1)`` over all blocks at batch N in
  {1, 2, 4, 8}; the fastest is the reference;
- ``capture bN``: ``layerfold.capture.capture_statistics`` at batch N in {1, 2, 4, 8};
- ``legacy b4``: the implementation capture replaced (every boundary of a batch kept as an fp32 copy,
  stacked, normalised, one einsum, full logits), at its old default batch of 4, for before/after.

Every variant first runs once untimed (warm-up; a variant that runs out of memory is recorded and
left out). Peak GPU memory is measured in one more run of each variant after garbage collection and a
reset of the peak counter; whatever was still allocated beyond the weights before that run
(``allocated_before_mib``) is taken out, so the peak is the weights plus what the variant itself
allocated (``peak_gpu_mib_raw`` keeps the counter's reading), shown as a multiple of the weights. A capture row meets its target when its median is
within 1.05x of the fastest plain forward and its peak within 1.15x of the weights. Capture rows also
carry the largest difference of their statistics to legacy's (mean cosine, off-diagonal last-token
angular distance, sample features relative to their largest magnitude).

Budget: on one H100 the default (two 8B-class shapes, 32 x 2048 tokens each, 3 repeats) takes about
4 minutes; ``--tokens 128x2048`` (the calibration set the 7.50 s / 8.89 s figures were measured on)
takes about 4x longer per shape, so run one shape per command there.
"""

from __future__ import annotations

import argparse
import gc
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import alternate, environment, forward_flops, llama_config, reset_peak_gpu, row, write_result
from run import device_slug

from layerfold.capture import LayerBoundaries, capture_statistics, iterate_batches
from layerfold.models import get_adapter, resolve_device, resolve_dtype
from layerfold.models.devices import device_name

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZES = (1, 2, 4, 8)
LEGACY_BATCH = 4
TARGET_SPEED, TARGET_MEMORY = 1.05, 1.15
DEFAULTS = {"cuda": (["llama2-7b", "llama3-8b"], "32x2048"), "cpu": (["tiny"], "4x64")}


def parse_tokens(text: str) -> tuple[int, int]:
    """``"32x2048"`` -> ``(32, 2048)`` (blocks, tokens per block)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or min(map(int, match.groups())) < 2:
        raise SystemExit(f"--tokens {text!r} is not NxT with N, T >= 2, e.g. 32x2048 (32 blocks of 2048 tokens).")
    return int(match[1]), int(match[2])


@torch.no_grad()
def plain_forward(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> None:
    device = next(model.parameters()).device
    for batch in iterate_batches(blocks, batch_size, device):
        model(input_ids=batch, use_cache=False, logits_to_keep=1)


@torch.no_grad()
def legacy_capture(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """The capture this benchmark measures against, as it was: fp32 copies of every boundary, stacked, normalised."""
    device = next(model.parameters()).device
    with LayerBoundaries(model) as hooks:
        b = len(hooks.layers) + 1
        cosine_sum, angular_sum, features, tokens = torch.zeros(b, b, dtype=torch.float64), torch.zeros(b, b, dtype=torch.float64), [], 0
        for batch in iterate_batches(blocks, batch_size, device):
            model(input_ids=batch, use_cache=False)
            boundaries = hooks.stacked()
            unit = F.normalize(boundaries.float(), dim=-1)
            flat = unit.flatten(0, 1)
            cosine_sum += torch.einsum("nid,njd->ij", flat, flat).double().cpu()
            last = unit[:, -1]
            cos = torch.einsum("bid,bjd->bij", last, last).clamp(-1.0, 1.0)
            angular_sum += (torch.arccos(cos) / torch.pi).sum(0).double().cpu()
            tokens += flat.shape[0]
            features.append(boundaries[:, 1:].float().mean(dim=1).transpose(0, 1).cpu())
    return {"cosine": cosine_sum / tokens, "last_token_angular": angular_sum / blocks.shape[0], "sample_features": torch.cat(features, dim=1)}


def streaming_capture(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int,
                      max_distance: int | None = None) -> dict[str, torch.Tensor]:
    stats = capture_statistics(model, blocks, batch_size, desc=None, max_distance=max_distance)
    return {"cosine": stats.cosine.double(), "last_token_angular": stats.last_token_angular.double(), "sample_features": stats.sample_features}


def differences(result: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest differences of one capture's statistics to the legacy ones (the diagonal of the angular distance is
    arccos of a rounded 1 in legacy and exactly 0 now, so it is left out; so are pairs beyond max_distance)."""
    off_diagonal = ~torch.eye(len(result["cosine"]), dtype=torch.bool)
    kept = result["cosine"].isfinite()  # with max_distance, pairs further apart are not computed (NaN)
    features, ref_features = result["sample_features"].float(), reference["sample_features"].float()
    return {
        "max_abs_diff_cosine_vs_legacy": float((result["cosine"] - reference["cosine"])[kept].abs().max()),
        "max_abs_diff_angular_vs_legacy": float((result["last_token_angular"] - reference["last_token_angular"])[off_diagonal & kept].abs().max()),
        "max_rel_diff_features_vs_legacy": float((features - ref_features).abs().max() / ref_features.abs().max().clamp_min(1e-30)),
    }


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # random init on the accelerator: host RAM stays small, seconds for 8B
        return AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype).eval()


def settled_allocation_mib(device: torch.device) -> float | None:
    """GPU memory held right before a measured run, after collecting garbage (None off CUDA).

    A variant's peak is reported as this baseline's excess over the weights taken out: in one run of
    this benchmark every variant, the plain forward included, read ~0.33x the weights higher than in
    the run before, a leftover of an earlier variant that the peak counter counted for all of them.
    """
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / 2**20


def measure_shape(shape: str, blocks: torch.Tensor, device: torch.device, dtype: torch.dtype, repeats: int,
                  max_distance: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All rows of one shape and a summary of its target check."""
    model = build_model(shape, device, dtype)
    config = model.config
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    n, seq = blocks.shape
    sizes = sorted({min(b, n) for b in BATCH_SIZES})
    variants: dict[str, Callable[[], Any]] = {f"plain b{b}": (lambda b=b: plain_forward(model, blocks, b)) for b in sizes}
    variants |= {f"capture b{b}": (lambda b=b: streaming_capture(model, blocks, b)) for b in sizes}
    if max_distance is not None:  # the pairs a method reads (capture.max_distance): fewer boundaries kept per batch
        variants |= {f"capture-d{max_distance} b{b}": (lambda b=b: streaming_capture(model, blocks, b, max_distance)) for b in sizes}
    variants[f"legacy b{min(LEGACY_BATCH, n)}"] = lambda: legacy_capture(model, blocks, min(LEGACY_BATCH, n))

    failed = {}
    for name in list(variants):  # warm-up, and leave out what does not fit
        try:
            variants[name]()
        except torch.OutOfMemoryError as error:
            failed[name] = str(error).splitlines()[0]
            del variants[name]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timings = alternate(variants, device, warmup=0, repeats=repeats)

    flops_base = dict(num_params_no_embed=get_adapter(model).non_embedding_parameters(model), tokens=n * seq,
                      num_layers=config.num_hidden_layers, hidden=config.hidden_size, seq_len=seq, vocab=config.vocab_size)
    logits_tokens = {"plain": n, "capture": 0, "legacy": n * seq}
    plain_best = min((name for name in timings if name.startswith("plain")), key=lambda name: timings[name].median)
    reference_s = timings[plain_best].median
    results, rows = {}, []
    for name, fn in variants.items():
        before_mib = settled_allocation_mib(device)
        reset_peak_gpu(device)
        results[name] = fn()
        kind, batch = name.split()[0].split("-")[0], int(name.split()[1][1:])
        r = row(f"{shape} {name}", timing=timings[name], tokens=n * seq, device=device, weights_mib=weights_mib,
                flops=forward_flops(**flops_base, logits_tokens=logits_tokens[kind]), shape=shape, variant=kind,
                batch_size=batch, ratio_to_best_plain=round(timings[name].median / reference_s, 4),
                max_distance=max_distance if "-d" in name.split()[0] else None)
        if before_mib is not None:  # the variant's own peak: what it added to what was held before it started
            r.update(peak_gpu_mib_raw=r["peak_gpu_mib"], allocated_before_mib=round(before_mib, 1),
                     peak_gpu_mib=round(r["peak_gpu_mib"] - before_mib + weights_mib, 1))
            r["peak_gpu_over_weights"] = round(r["peak_gpu_mib"] / weights_mib, 3)
        if kind != "plain":
            memory = r.get("peak_gpu_over_weights")  # None off-GPU: only the speed part can be checked there
            r.update(target=f"<= {TARGET_SPEED}x {plain_best} ({reference_s:.3f} s) and peak <= {TARGET_MEMORY}x weights",
                     met=None if memory is None else bool(r["ratio_to_best_plain"] <= TARGET_SPEED and memory <= TARGET_MEMORY))
        rows.append(r)
    legacy = next((name for name in results if name.startswith("legacy")), None)
    for r in rows:
        if r["variant"] == "capture" and legacy is not None:
            r.update(differences(results[r["name"].removeprefix(f"{shape} ")], results[legacy]))
    rows += [dict(name=f"{shape} {name}", shape=shape, error=f"out of memory: {message}") for name, message in failed.items()]

    captures = [r for r in rows if r.get("variant") == "capture"]
    fitting = [r for r in captures if r.get("peak_gpu_over_weights") is not None and r["peak_gpu_over_weights"] <= TARGET_MEMORY]
    fastest = min(captures, key=lambda r: r["seconds"], default=None)
    fastest_fitting = min(fitting, key=lambda r: r["seconds"], default=None)
    summary = {
        "shape": shape, "weights_mib": round(weights_mib, 1), "best_plain": plain_best, "best_plain_s": round(reference_s, 4),
        "fastest_capture": fastest and fastest["name"], "fastest_capture_ratio": fastest and fastest["ratio_to_best_plain"],
        "fastest_capture_peak_over_weights": fastest and fastest.get("peak_gpu_over_weights"),
        "fastest_capture_within_memory": fastest_fitting and fastest_fitting["name"],
        "fastest_capture_within_memory_ratio": fastest_fitting and fastest_fitting["ratio_to_best_plain"],
        "target_met": any(r.get("met") for r in captures) if device.type == "cuda" else None,
    }
    del model, variants, results
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", help="shapes from benchmarks/common.SHAPES (default: llama2-7b llama3-8b on CUDA, tiny on CPU)")
    parser.add_argument("--tokens", help="NxT: N random blocks of T tokens (default 32x2048 on CUDA, 4x64 on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant after the warm-up (default 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-distance", type=int, default=None,
                        help="also time capture with capture.max_distance=D (only pairs of boundaries at most D apart)")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/capture_speed_<device>.json)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    default_shapes, default_tokens = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    shapes = args.shape or default_shapes
    n, seq = parse_tokens(args.tokens or default_tokens)
    rows, summaries = [], []
    for shape in shapes:
        vocab = llama_config(shape).vocab_size
        blocks = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
        shape_rows, summary = measure_shape(shape, blocks, device, dtype, args.repeats, args.max_distance)
        rows += shape_rows
        summaries.append(summary)
        print(summary, flush=True)

    record = {
        "benchmark": "capture_speed",
        "environment": environment(device),
        "settings": {"shapes": shapes, "tokens": f"{n}x{seq}", "dtype": str(dtype).replace("torch.", ""), "repeats": args.repeats,
                     "max_distance": args.max_distance, "batch_sizes": list(BATCH_SIZES), "legacy_batch": LEGACY_BATCH, "weights": "random (time and memory only)",
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "summaries": summaries},
        "rows": rows,
        "notes": ("Variants alternate round-robin in one process after one untimed run each; ratio_to_best_plain = median / the "
                  "fastest plain forward's median (logits_to_keep=1). Capture runs the decoder without the LM head and streams "
                  "every boundary into BoundaryStatistics as its layer finishes; legacy is the stacked fp32 implementation it "
                  "replaced. Peak GPU memory is that of one more run of each variant after garbage collection and a reset: the "
                  "weights plus what the variant allocated above the memory held before it (allocated_before_mib; raw counter "
                  "in peak_gpu_mib_raw). "
                  "Random weights: the statistics' values mean nothing, only their agreement with legacy does."),
    }
    write_result(args.out or RESULTS / f"capture_speed_{device_slug(device_name(device))}.json", record)


if __name__ == "__main__":
    main()
