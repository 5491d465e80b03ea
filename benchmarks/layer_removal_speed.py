"""Benchmark: prefill latency, decode throughput and peak memory before and after removing layers.

    python benchmarks/layer_removal_speed.py artifacts/base --remove 8 --out benchmarks/results/cpu_smollm2.json

Both measurements run in one process on one device, so the ratio is meaningful even on a shared
CPU; absolute numbers are only comparable on the same machine. Layers are removed from the middle
(ShortGPT's usual choice); which ones does not change the cost.
"""

import argparse
import json
from pathlib import Path

import torch

from layerfold.evaluation.efficiency import measure_efficiency
from layerfold.io import write_json
from layerfold.models import get_adapter, load_checkpoint, resolve_device
from layerfold.surgery import remove_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--remove", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = resolve_device("auto")
    model, _ = load_checkpoint(args.checkpoint, device)
    settings = dict(batch_size=args.batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    dense = measure_efficiency(model, **settings)
    layers = get_adapter(model).num_layers(model)
    start = (layers - args.remove) // 2
    remove_layers(model, range(start, start + args.remove))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pruned = measure_efficiency(model, **settings)
    result = {
        "checkpoint": str(args.checkpoint),
        "removed_layers": list(range(start, start + args.remove)),
        "dense": {k: v for k, v in dense.items() if k != "params_per_layer"},
        "pruned": {k: v for k, v in pruned.items() if k != "params_per_layer"},
        "prefill_speedup": dense["prefill_latency_ms"] / pruned["prefill_latency_ms"],
        "decode_speedup": pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "layer_ratio": layers / (layers - args.remove),
    }
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k.endswith("speedup") or k == "layer_ratio"}, indent=2))


if __name__ == "__main__":
    main()
