"""Benchmark: SLEB's greedy search before and after sharing the prefix -- seconds, layer passes, same blocks.

    python benchmarks/sleb_search.py --checkpoint artifacts/base --out benchmarks/results/sleb_search_h100.json  # GPU (< 5 min expected)
    python benchmarks/sleb_search.py --checkpoint artifacts/base --blocks 2 --seq-len 64 --scaling-blocks 2,4 \
        --repeats 3 --threads 1 --out benchmarks/results/cpu_smollm2_sleb_search.json                          # CPU, ~10 min
    python benchmarks/sleb_search.py --shape tiny                                                                # CPU smoke run

*Before* is the search as it was, kept here as the reference: every candidate block removed on trial
and the whole model run over the calibration windows. *After* is the ``sleb`` method, whose
:func:`~layerfold.execution.loss.removal_nll` keeps the hidden state entering each candidate and runs
only the blocks after it. Both start from the same dense model every time (each search runs inside a
trial that is undone) and alternate round-robin in one process. The script fails unless both remove
the same blocks in the same order; the largest difference between their candidate losses is recorded
(0.0 where the kernels are deterministic). *After, one batch* scores all windows in one batch
(``--wide-batch``): faster on a GPU, same choices expected but not guaranteed bit for bit, so it is
reported, not asserted. Scaling rows time one search step (every unprotected candidate once) for
2-3 depths (the first ``n`` blocks of the model) and 2 window counts.

Layer passes and FLOPs are counted from the candidates each step scored: before, ``C_s (L_s - 1)``
block passes and ``C_s`` heads per step; after, the prefix up to the last candidate plus the tails
``L_s - 1 - i``, and the same heads (see ``layerfold.methods.sleb``). A dense forward for the
reference loss is in both.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import alternate, environment, forward_flops, llama_config, peak_gpu_mib, reset_peak_gpu, row, shown, write_result
from omegaconf import OmegaConf

import layerfold.methods.sleb as sleb_module
from layerfold.execution.loss import calibration_nll, removal_nll
from layerfold.methods import MethodContext
from layerfold.methods.sleb import SLEBConfig, sleb
from layerfold.models import get_adapter, load_checkpoint, resolve_device, resolve_dtype

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"



SCALING = (
    "SLEB search, k steps; step s has L_s = L - s blocks and C_s candidates (L_s - 2 with one protected block at "
    "each end), each scored over N windows of T tokens. Block passes over the N T tokens: before sum_s C_s (L_s - 1) "
    "(~ k L^2 for k << L); after sum_s (last candidate + sum_i (L_s - 1 - i)) (~ k L^2 / 2); LM heads sum_s C_s in both "
    "(O(N T d V) each). A block pass is O(N T (d^2 + d d_ff) + N T^2 d). Extra memory after: one hidden state per "
    "window, N T d values in the model dtype, on the device."
)


# --------------------------------------------------------------------------------------------
# The two searches
# --------------------------------------------------------------------------------------------


def search_before(ctx: MethodContext, cfg: SLEBConfig) -> dict[str, Any]:
    """The replaced search: one trial removal and one full calibration forward per candidate."""
    calibration_nll(ctx.model, ctx.calibration, ctx.batch_size)  # the dense loss, as sleb records it
    total = ctx.plan.original_layers
    protected = set(range(min(cfg.protect_first, total))) | set(range(max(total - cfg.protect_last, 0), total))
    order, steps = [], []
    for _ in range(cfg.num_remove):
        candidates = [i for i, group in enumerate(ctx.plan.groups) if not protected.intersection(group)]
        losses = {}
        for i in candidates:
            with ctx.trial():
                ctx.remove([i])
                losses[i] = calibration_nll(ctx.model, ctx.calibration, ctx.batch_size)
        best = min(losses, key=lambda i: (losses[i], i))
        order.extend(ctx.plan.groups[best])
        steps.append({"layers": ctx.num_layers, "losses": losses})
        ctx.remove([best])
    return {"removal_order": order, "steps": steps}


def search_after(ctx: MethodContext, cfg: SLEBConfig) -> dict[str, Any]:
    """The ``sleb`` method as the pipeline runs it (shared prefix), with its unrounded candidate losses."""
    seen: list[dict[int, float]] = []

    def recorded(*args: Any, **kwargs: Any) -> dict[int, float]:
        seen.append(removal_nll(*args, **kwargs))
        return seen[-1]

    sleb_module.removal_nll = recorded  # plan.json rounds the losses to 1e-6; the comparison wants them whole
    try:
        details = sleb(ctx, cfg)
    finally:
        sleb_module.removal_nll = removal_nll
    steps = [{"layers": ctx.plan.original_layers - step["step"] + 1, "losses": losses} for step, losses in zip(details["steps"], seen)]
    return {"removal_order": details["removal_order"], "steps": steps}


def undone(search: Callable[[MethodContext, SLEBConfig], dict], ctx: MethodContext, cfg: SLEBConfig) -> Callable[[], dict]:
    """``search`` on the dense model, undone afterwards, so every run starts from the same model."""
    def run() -> dict[str, Any]:
        with ctx.trial():
            return search(ctx, cfg)
    return run


def one_step(ctx: MethodContext, blocks: torch.Tensor, depth: int, batch_size: int) -> dict[str, Callable[[], dict]]:
    """One search step over candidates ``1..depth-2`` of the current model, the replaced way and the shared-prefix way."""
    def before() -> dict[int, float]:
        losses = {}
        for i in range(1, depth - 1):
            with ctx.trial():
                ctx.remove([i])
                losses[i] = calibration_nll(ctx.model, blocks, batch_size)
        return losses

    return {"before": before, "after": lambda: removal_nll(ctx.model, blocks, range(1, depth - 1), batch_size)}


# --------------------------------------------------------------------------------------------
# Counting the work
# --------------------------------------------------------------------------------------------


def passes(steps: list[dict[str, Any]], num_layers: int) -> dict[str, dict[str, int]]:
    """Block and head passes over the calibration tokens of both searches, from the candidates scored."""
    before = {"blocks": num_layers, "heads": 1}  # the dense loss
    after = dict(before)
    for step in steps:
        layers, candidates = step["layers"], sorted(step["losses"])
        before["blocks"] += len(candidates) * (layers - 1)
        after["blocks"] += candidates[-1] + sum(layers - 1 - i if i < layers - 1 else layers - 1 for i in candidates)
        for counts in (before, after):
            counts["heads"] += len(candidates)
    return {"before": before, "after": after}


def flops_of(counts: dict[str, int], model: torch.nn.Module, tokens: int, seq_len: int) -> float:
    """Forward FLOPs of ``counts`` block and head passes over ``tokens`` (``benchmarks/common.forward_flops``)."""
    adapter = get_adapter(model)
    per_block = sum(p.numel() for p in adapter.get_layers(model)[0].parameters())
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    blocks = forward_flops(per_block * counts["blocks"], tokens, counts["blocks"], hidden, seq_len)
    return blocks + counts["heads"] * forward_flops(0, tokens, vocab=vocab, hidden=hidden)


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """The model and ``[blocks, seq_len]`` calibration windows (WikiText-2 train for a checkpoint, random for a shape)."""
    generator = torch.Generator().manual_seed(0)
    if args.shape:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        overrides = {"num_hidden_layers": args.num_layers} if args.num_layers else {}
        model = AutoModelForCausalLM.from_config(llama_config(args.shape, **overrides), dtype=dtype).to(device).eval()
        windows = torch.randint(0, model.config.vocab_size, (max(args.blocks, *args.scaling_blocks), args.seq_len), generator=generator)
        return model, windows, {"shape": args.shape, "weights": "random (time only; the blocks chosen mean nothing)", "calibration": "random tokens"}
    from layerfold.data.calibration import build_calibration

    model, tokenizer = load_checkpoint(args.checkpoint, device, dtype)
    data = OmegaConf.load(REPO / "conf/data/wikitext2.yaml")
    data.calibration.num_blocks, data.calibration.seq_len = max(args.blocks, *args.scaling_blocks), args.seq_len
    windows, meta = build_calibration(data.calibration, tokenizer, data.local_dir)
    return model, windows, {"checkpoint": shown(args.checkpoint), "calibration": f"{meta['source']} ({meta['chunking']}, seed {meta['seed']})"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="checkpoint directory (default artifacts/base)")
    source.add_argument("--shape", help="random weights of a shape from benchmarks/common.SHAPES (e.g. tiny)")
    parser.add_argument("--num-layers", type=int, help="with --shape: blocks of the random model (default: the shape's)")
    parser.add_argument("--blocks", type=int, help="calibration windows N (default 32 on CUDA, 4 on CPU)")
    parser.add_argument("--seq-len", type=int, help="tokens per window T (default 256 on CUDA, 128 on CPU)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward, as capture.batch_size (default 4)")
    parser.add_argument("--wide-batch", type=int, help="windows per forward of the 'one batch' row (default: all N; 0 skips it)")
    parser.add_argument("--num-remove", type=int, help="SLEB steps k (default 8 on CUDA, 2 on CPU)")
    parser.add_argument("--scaling-layers", type=lambda s: [int(v) for v in s.split(",")], help="depths of the scaling rows (default L/3, 2L/3, L)")
    parser.add_argument("--scaling-blocks", type=lambda s: [int(v) for v in s.split(",")], help="window counts of the scaling rows (default N, 2N on CUDA; N on CPU)")
    parser.add_argument("--repeats", type=int, help="timed runs per variant after one untimed run (default 2 on CUDA, 1 on CPU)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 on a shared, oversubscribed CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/sleb_search_<device type>.json)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    if not args.shape and args.checkpoint is None:
        args.checkpoint = REPO / "artifacts/base"
    args.blocks = args.blocks or (32 if on_gpu else 4)
    args.seq_len = args.seq_len or (256 if on_gpu else 128)
    args.num_remove = args.num_remove or (8 if on_gpu else 2)
    args.scaling_blocks = args.scaling_blocks or ([args.blocks, 2 * args.blocks] if on_gpu else [args.blocks])
    repeats = args.repeats or (2 if on_gpu else 1)
    wide = args.blocks if args.wide_batch is None else args.wide_batch
    if args.threads:
        torch.set_num_threads(args.threads)
    load_average = [round(v, 2) for v in os.getloadavg()]  # other work on the host slows small-tensor torch ops most

    model, windows, loaded = load(args, device, dtype)
    num_layers = get_adapter(model).num_layers(model)
    depths = args.scaling_layers or sorted({max(3, round(num_layers * f)) for f in (1 / 3, 2 / 3, 1.0)})
    if not all(3 <= depth <= num_layers for depth in depths):
        raise SystemExit(f"--scaling-layers {depths}: each depth must lie in 3..{num_layers} (the model's blocks).")
    calibration = windows[: args.blocks]
    tokens = calibration.numel()
    cfg = SLEBConfig(num_remove=args.num_remove)
    ctx = MethodContext(model, None, calibration, stats=None, batch_size=args.batch_size)
    variants = {"before": undone(search_before, ctx, cfg), "after": undone(search_after, ctx, cfg)}
    if wide > args.batch_size:
        variants["after, one batch"] = undone(search_after, MethodContext(model, None, calibration, stats=None, batch_size=wide), cfg)

    # One untimed run each: the chosen blocks, the losses and each variant's peak memory (also the warm-up).
    results, peaks = {}, {}
    for name, run in variants.items():
        reset_peak_gpu(device)
        results[name] = run()
        peaks[name] = peak_gpu_mib(device)
        print(name, results[name]["removal_order"], flush=True)
    before, after = results["before"], results["after"]
    if before["removal_order"] != after["removal_order"]:
        raise SystemExit(f"The searches disagree: before removed {before['removal_order']}, after {after['removal_order']}.")

    def loss_difference(result: dict[str, Any]) -> float:
        """Largest |loss before - loss of this variant| over the candidates both scored (same model, same step)."""
        return max((abs(a["losses"][i] - b["losses"][i]) for a, b in zip(before["steps"], result["steps"]) for i in a["losses"] if i in b["losses"]),
                   default=0.0)

    max_diff = loss_difference(after)
    timings = alternate(variants, device, warmup=0, repeats=repeats)

    counted = passes(before["steps"], num_layers)
    candidate_tokens = tokens * sum(len(s["losses"]) for s in before["steps"])
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rows = []
    for name, timing in timings.items():
        counts = counted["before" if name == "before" else "after"]
        extra: dict[str, Any] = dict(
            block_passes=counts["blocks"], head_passes=counts["heads"], removal_order=results[name]["removal_order"],
            same_blocks_as_before=results[name]["removal_order"] == before["removal_order"],
            max_loss_difference_vs_before=loss_difference(results[name]),
            batch_size=wide if name == "after, one batch" else args.batch_size, peak_gpu_mib=peaks[name],
        )
        if peaks[name] is not None:
            extra["peak_gpu_over_weights"] = round(peaks[name] / weights_mib, 3)
        if name != "before":
            extra["speedup"] = round(timings["before"].median / timing.median, 2)
        rows.append(row(f"sleb search {name} (L={num_layers}, k={args.num_remove}, N={args.blocks}, T={args.seq_len})", timing=timing,
                        tokens=candidate_tokens, flops=flops_of(counts, model, tokens, args.seq_len), device=device, **extra))
        print(rows[-1], flush=True)

    # Scaling: one step (every unprotected candidate once) at several depths and window counts.
    scaling = []
    for depth in depths:
        for n in args.scaling_blocks:
            blocks = windows[:n]
            step = {"layers": depth, "losses": dict.fromkeys(range(1, depth - 1), 0.0)}
            counts = passes([step], depth)
            for key in counts:  # one step only: no dense loss
                counts[key] = {"blocks": counts[key]["blocks"] - depth, "heads": counts[key]["heads"] - 1}
            with ctx.trial():
                ctx.remove(list(range(depth, num_layers)))  # the first `depth` blocks
                timed = alternate(one_step(ctx, blocks, depth, args.batch_size), device, warmup=1 if on_gpu else 0, repeats=repeats)
            for name, timing in timed.items():
                speedup = {"speedup": round(timed["before"].median / timing.median, 2)} if name == "after" else {}
                rows.append(row(f"sleb step {name} (L={depth}, N={n}, T={args.seq_len})", timing=timing, tokens=blocks.numel() * (depth - 2),
                                flops=flops_of(counts[name], model, blocks.numel(), args.seq_len), device=device,
                                block_passes=counts[name]["blocks"], head_passes=counts[name]["heads"], layers=depth, windows=n, **speedup))
            scaling.append({"layers": depth, "windows": n, **{f"{k}_seconds": round(t.median, 3) for k, t in timed.items()},
                            "speedup": round(timed["before"].median / timed["after"].median, 2)})
            print(scaling[-1], flush=True)

    speedups = ", ".join(f"{r['name']}: {r['speedup']}x" for r in rows if "speedup" in r)
    record = {
        "benchmark": "sleb_search",
        "environment": environment(device),
        "settings": {**loaded, "layers": num_layers, "num_remove": args.num_remove, "protect_first": cfg.protect_first,
                     "protect_last": cfg.protect_last, "windows": args.blocks, "seq_len": args.seq_len, "batch_size": args.batch_size,
                     "wide_batch": wide, "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
                     "threads": torch.get_num_threads(), "load_average_at_start": load_average},
        "rows": rows,
        "notes": (f"Before (trial removal, full forward per candidate) and after (shared prefix) alternate in one process; both "
                  f"removed {before['removal_order']}; largest candidate-loss difference {max_diff:.2e}. {speedups}. "
                  "Block/head passes are counted from the candidates scored."),
        "scaling": scaling,
        "scaling_statement": SCALING,
        "max_candidate_loss_difference": max_diff,
    }
    write_result(args.out or RESULTS / f"sleb_search_{device.type}.json", record)



if __name__ == "__main__":
    main()
