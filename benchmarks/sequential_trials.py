"""Benchmark: SLEB's and LaCo's trials layer-major on a Llama-3-70B-shaped model, one GPU.

    python benchmarks/sequential_trials.py --shape llama3-70b --out benchmarks/results/sequential_trials_h100.json   # one H100
    python benchmarks/sequential_trials.py --shape tiny                                                            # CPU smoke run

The model never exists as a whole: layers are drawn per layer on the device by
``layerfold.execution.SeededLayerLoader`` and the methods run through
``MethodContext.layer_major`` (the context ``hardware=sequential`` gives the compress stage). Rows,
each with its wall time (one run: every row is seconds to minutes long and does its own warm-up
layer), peak GPU memory (reset per row) and the process's peak host RSS:

1. ``sleb dense nll``: mean next-token NLL of the calibration blocks through the whole stack;
2. ``sleb step``: one SLEB removal step over ``--candidates`` consecutive candidates starting at
   ``--first-candidate`` (default: the middle of the stack), the prefix shared: the layers before the
   first candidate run once, then each candidate costs its suffix and one LM head;
3. ``laco reference``: the final-norm states of LaCo's five sentences through the dense stack (every
   boundary kept for the trials);
4. ``laco trial``: one RDSC merge of ``--merge-layers`` layers at the top of the stack (the first LaCo
   trial), run from the dense boundary at its base.

Random weights and tokens (seeded): time and memory, never accuracy.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from common import SHAPES, Timing, add_layer_major_args, environment, llama_config, reset_peak_gpu, row, write_result

from layerfold.execution import SeededLayerLoader
from layerfold.methods import MethodContext
from layerfold.methods.laco import LACO_SENTENCES
from layerfold.models import resolve_device, resolve_dtype
from layerfold.scoring.loss import representation_similarity
from layerfold.surgery import rdsc_paper

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {"tiny": dict(calib="4x64", candidates=2, merge_layers=2), "*": dict(calib="8x2048", candidates=4, merge_layers=4)}
SENTENCE_TOKENS = 20  # LaCo's sentences are 8-20 tokens with Llama-3's tokenizer; random ids of these lengths stand in


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-70b", choices=sorted(SHAPES))
    parser.add_argument("--calib", help="calibration blocks NxT (default 8x2048; tiny: 4x64)")
    parser.add_argument("--candidates", type=int, help="SLEB candidates in the timed step (default 4; tiny: 2)")
    parser.add_argument("--first-candidate", type=int, help="position of the first candidate (default: the middle layer)")
    parser.add_argument("--merge-layers", type=int, help="LaCo's C: layers in the trial merge (default 4; tiny: 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per decoder-layer call (default 4)")
    add_layer_major_args(parser, "sequential_trials")
    args = parser.parse_args(argv)
    defaults = DEFAULTS.get(args.shape, DEFAULTS["*"])
    match = re.fullmatch(r"(\d+)x(\d+)", args.calib or defaults["calib"])
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 2:
        raise SystemExit(f"--calib {args.calib!r} is not NxT with N >= 1 sequences of T >= 2 tokens, e.g. 8x2048.")
    args.calib = (int(match.group(1)), int(match.group(2)))
    args.candidates = args.candidates or defaults["candidates"]
    args.merge_layers = args.merge_layers or defaults["merge_layers"]
    return args


def measured(name: str, fn, device: torch.device, **extra) -> tuple[dict, object]:
    """One run of ``fn`` as a row (wall seconds, device-synchronised; peaks since this row began)."""
    reset_peak_gpu(device)
    began = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return row(name, timing=Timing([time.perf_counter() - began]), device=device, **extra), result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = llama_config(args.shape)
    layers = config.num_hidden_layers
    first = max(1, min(layers // 2, layers - 1 - args.candidates)) if args.first_candidate is None else args.first_candidate
    candidates = list(range(first, first + args.candidates))
    if not (1 <= first and candidates[-1] < layers - 1) or not 2 <= args.merge_layers < layers:
        raise SystemExit(f"Candidates {candidates} must lie in 1..{layers - 2} and --merge-layers in 2..{layers - 1} for {layers} layers.")
    loader = SeededLayerLoader(config, seed=args.seed, dtype=dtype)
    hardware = {"mode": "sequential", "activations": args.activations, "prefetch": not args.no_prefetch, "batch_size": args.batch_size}
    generator = torch.Generator().manual_seed(args.seed)
    blocks = torch.randint(0, config.vocab_size, args.calib, generator=generator)
    sentences = [torch.randint(0, config.vocab_size, (SENTENCE_TOKENS - 3 * k,), generator=generator) for k in range(len(LACO_SENTENCES))]

    rows = []
    ctx = MethodContext.layer_major(loader, None, blocks, hardware, device, dtype, batch_size=args.batch_size)
    tokens = blocks.numel()
    line, dense = measured("sleb dense nll", ctx.calibration_nll, device, tokens=tokens, layer_passes=layers)
    rows.append({**line, "loss": round(dense, 4)})
    passes = candidates[-1] + sum(layers - 1 - i for i in candidates)
    line, losses = measured("sleb step", lambda: ctx.removal_nll(candidates), device, tokens=tokens, candidates=candidates, layer_passes=passes)
    rows.append({**line, "losses": {str(i): round(v, 4) for i, v in losses.items()}, "chosen": min(losses, key=lambda i: (losses[i], i))})

    base = layers - 1 - args.merge_layers
    line, reference = measured("laco reference", lambda: ctx.final_representations(sentences), device,
                               tokens=sum(s.numel() for s in sentences), layer_passes=layers)
    rows.append(line)

    def trial() -> float:
        with ctx.trial(changed=[base]):
            ctx.merge(base, list(range(base + 1, base + args.merge_layers)), rdsc_paper)
            return representation_similarity(reference, ctx.final_representations(sentences))

    line, similarity = measured("laco trial", trial, device, tokens=sum(s.numel() for s in sentences), base=base,
                                merged=list(range(base, base + args.merge_layers)), layer_passes=layers - args.merge_layers + 1 - base)
    rows.append({**line, "similarity": round(similarity, 4)})

    record = {
        "benchmark": "sequential_trials",
        "environment": environment(device),
        "settings": {"shape": args.shape, "layers": layers, "dtype": str(dtype).replace("torch.", ""), "calibration": list(args.calib),
                     "batch_size": args.batch_size, "activations": ctx.stack.report.activations, "prefetch": not args.no_prefetch,
                     "sentences": [int(s.numel()) for s in sentences], "seed": args.seed},
        "rows": rows,
        "notes": ("Seeded random weights drawn per layer on the device (SeededLayerLoader); the model never exists as a whole. "
                  "Time and memory only: losses and similarities of random weights carry no meaning. "
                  f"Execution report of all rows: {ctx.stack.report.as_dict()}"),
    }
    write_result(args.out or RESULTS / f"sequential_trials_{device.type}.json", record)
    return record


if __name__ == "__main__":
    main()
