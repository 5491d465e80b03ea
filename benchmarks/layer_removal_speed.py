"""Benchmark: prefill latency, decode throughput and peak memory of a model before and after removing
layers, measured as a pair: both models in one process on one device, timed round-robin.

    python benchmarks/layer_removal_speed.py --checkpoint artifacts/base --remove 8 --out benchmarks/results/layer_removal_speed_h100.json
    python benchmarks/layer_removal_speed.py --checkpoint artifacts/base --compressed artifacts/compressed
    python benchmarks/layer_removal_speed.py --shape llama3-8b --remove 8 --settings 1x128:32,8x512:128
    python benchmarks/layer_removal_speed.py --shape tiny --remove 2 --settings 1x32:8        # CPU smoke run

The compressed model is the dense one with ``--remove`` layers taken out of the middle of a copy
(which layers does not change the cost), or the checkpoint given by ``--compressed``. ``--shape``
uses random weights of a paper-scale configuration (``benchmarks/common.SHAPES``): real time and
memory, no accuracy. Each ``--settings`` entry ``BxT:N`` is a batch of B prompts of T random tokens
and N decoded tokens; the defaults on CUDA go from launch-bound (1x128) to compute-bound (32x2048).

Per setting and model the record has a prefill row (last position's logits only) and a decode row
(N single-token forwards on the KV cache after an untimed prefill), each with the median and min-max
of the repeats; compressed rows carry the speed-up over dense with its range, the FLOP bound
(dense / compressed forward FLOPs per token: layers, attention, LM head) and ``measurement_suspect``
when even the least favourable pairing of runs beats the bound. Peak GPU memory is that of one
prefill + decode, above everything else resident, plus the model's own weights.

Budget (estimated from eager decode at ~30 ms a step, not yet measured): SmolLM2-135M with the
three CUDA settings, 3 warm-up rounds and 10 repeats, about 4 minutes on one H100; llama3-8b with
1x128:32,8x512:128 about the same. On a shared CPU pass ``--threads 1``: two intra-op threads
spin-waiting for a busy core can make one forward 10x slower.
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path
from typing import Any

import torch
from common import Timing, environment, llama_config, row, write_result

from layerfold.evaluation.efficiency import compare_efficiency
from layerfold.models import get_adapter, load_checkpoint, resolve_device, resolve_dtype
from layerfold.surgery import remove_layers

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SETTINGS = {"cuda": "1x128:32,8x512:128,32x2048:128", "cpu": "1x128:32"}
SETTING = re.compile(r"(\d+)x(\d+):(\d+)")


def parse_settings(text: str) -> list[tuple[int, int, int]]:
    """``"1x128:32,8x512:128"`` -> ``[(1, 128, 32), (8, 512, 128)]`` (batch, prompt tokens, new tokens)."""
    settings = []
    for item in text.split(","):
        match = SETTING.fullmatch(item.strip())
        if not match or min(map(int, match.groups())) < 1:
            raise SystemExit(f"--settings entry {item!r} is not BxT:N with positive integers, e.g. 8x512:128 "
                             "(batch 8, 512 prompt tokens, 128 new tokens).")
        settings.append(tuple(map(int, match.groups())))
    return settings


def middle_block(num_layers: int, remove: int) -> list[int]:
    """The ``remove`` consecutive layers centred in the stack."""
    if not 1 <= remove < num_layers:
        raise SystemExit(f"--remove {remove} is outside 1..{num_layers - 1} for a model of {num_layers} layers.")
    start = (num_layers - remove) // 2
    return list(range(start, start + remove))


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({"dense": model, "compressed": model}, what was loaded and removed)``."""
    if args.shape:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(device):  # random init on the accelerator: seconds instead of minutes for 8B
            dense = AutoModelForCausalLM.from_config(llama_config(args.shape), dtype=dtype).eval()
        source = {"shape": args.shape, "weights": "random (time and memory only)"}
    else:
        dense, _ = load_checkpoint(args.checkpoint, device, dtype)
        source = {"checkpoint": str(args.checkpoint)}
    layers = get_adapter(dense).num_layers(dense)
    if args.compressed:
        compressed, _ = load_checkpoint(args.compressed, device, dtype)
        source["compressed"] = str(args.compressed)
    else:
        removed = args.layers if args.layers is not None else middle_block(layers, args.remove)
        compressed = remove_layers(copy.deepcopy(dense), removed)
        source["removed_layers"] = removed
    return {"dense": dense, "compressed": compressed}, source


def rows_of(comparison: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """Prefill and decode rows of one setting, dense first, in ``benchmarks/common.row``'s layout."""
    out = []
    for name, record in comparison["models"].items():
        b, t, n = record["batch_size"], record["prompt_len"], record["new_tokens"]
        speedups = comparison["speedups"].get(name, {})
        for phase, tokens, runs_key in (("prefill", b * t, "prefill"), ("decode", b * n, "decode")):
            timing = Timing([ms / 1000 for ms in record["runs_ms"][runs_key]])
            check = speedups.get(phase)
            on_gpu = device.type == "cuda" and phase == "decode"  # the peak is measured over prefill + decode
            extra: dict[str, Any] = dict(
                shape=f"{b}x{t}" + (f":{n}" if phase == "decode" else ""), model=name, layers=record["num_layers"],
                peak_gpu_mib=record["peak_memory_mib"] if on_gpu else None,
            )
            if on_gpu:
                extra["peak_gpu_over_weights"] = round(record["peak_memory_mib"] / record["weights_mib"], 3)
            if phase == "prefill":
                extra["single_token_forward_ms"] = record["single_token_forward_ms"]
            if check:
                extra.update({k: v for k, v in check.items() if k != "measurement_suspect"})
                extra.update(target=f"speed-up within FLOP bound {check['speedup_bound']:.2f}x", met=not check["measurement_suspect"],
                             measurement_suspect=check["measurement_suspect"])
            out.append(row(f"{phase} {name} ({record['num_layers']}L)", timing=timing, tokens=tokens,
                           flops=record["flops_per_token"][phase] * tokens, device=device, **extra))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="dense checkpoint directory (e.g. artifacts/base)")
    source.add_argument("--shape", help="random weights of a paper-scale shape from benchmarks/common.SHAPES (e.g. llama3-8b, tiny)")
    parser.add_argument("--compressed", type=Path, help="compressed checkpoint to compare with (default: remove layers from a copy)")
    parser.add_argument("--remove", type=int, default=8, help="layers to remove from the middle of a copy (default 8)")
    parser.add_argument("--layers", type=lambda s: [int(i) for i in s.split(",")], help="remove these layers instead, e.g. 12,13,14")
    parser.add_argument("--settings", help=f"comma-separated BxT:N (default on CUDA {DEFAULT_SETTINGS['cuda']}, on CPU {DEFAULT_SETTINGS['cpu']})")
    parser.add_argument("--warmup", type=int, default=3, help="untimed round-robin rounds before timing (default 3)")
    parser.add_argument("--repeats", type=int, help="timed runs per model (default 10 on CUDA, 5 on CPU)")
    parser.add_argument("--min-warmup-s", type=float, help="keep warming up at least this long (default 1.0 on CUDA: clocks ramp up)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 is steadier on a shared machine)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/layer_removal_speed_<device type>.json)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    on_gpu = device.type == "cuda"
    settings = parse_settings(args.settings or DEFAULT_SETTINGS["cuda" if on_gpu else "cpu"])
    repeats = args.repeats or (10 if on_gpu else 5)
    min_warmup_s = args.min_warmup_s if args.min_warmup_s is not None else (1.0 if on_gpu else 0.0)
    models, loaded = load_models(args, device, dtype)

    comparisons, rows, notes = [], [], []
    for batch, prompt, new in settings:
        print(f"[layer_removal_speed] {batch}x{prompt}:{new}: {args.warmup} warm-up rounds, {repeats} timed, round-robin", flush=True)
        comparison = compare_efficiency(models, batch_size=batch, prompt_len=prompt, new_tokens=new, warmup=args.warmup,
                                        repeats=repeats, min_warmup_s=min_warmup_s)
        comparisons.append(comparison)
        rows += rows_of(comparison, device)
        for phase, check in comparison["speedups"]["compressed"].items():
            if phase == "reference":
                continue
            notes.append(f"{batch}x{prompt}:{new} {phase}: {check['speedup']:.2f}x [{check['speedup_min']:.2f}-{check['speedup_max']:.2f}] "
                         f"vs FLOP bound {check['speedup_bound']:.2f}x" + (" SUSPECT" if check["measurement_suspect"] else ""))

    dense, compressed = (get_adapter(m).num_layers(m) for m in models.values())
    record = {
        "benchmark": "layer_removal_speed",
        "environment": environment(device),
        "settings": {**loaded, "dense_layers": dense, "compressed_layers": compressed, "layer_ratio": round(dense / compressed, 4),
                     "dtype": str(dtype).replace("torch.", ""), "settings": [f"{b}x{t}:{n}" for b, t, n in settings],
                     "warmup": args.warmup, "repeats": repeats, "min_warmup_s": min_warmup_s, "threads": torch.get_num_threads()},
        "rows": rows,
        "notes": ("Dense and compressed alternate round-robin in one process; speed-up = dense / compressed median time "
                  "[least-most favourable pairing of runs]; bound = dense / compressed forward FLOPs per token. " + "; ".join(notes)),
        "comparisons": comparisons,
    }
    write_result(args.out or RESULTS / f"layer_removal_speed_{device.type}.json", record)


if __name__ == "__main__":
    main()
