"""Benchmark: the cost of ReplaceMe's estimation (stream the window, solve the normal equations), resident and layer by layer.

    python benchmarks/replaceme_cost.py --checkpoint artifacts/base --calib 32x256,8x256 --out benchmarks/results/replaceme_cost_smollm2_cpu.json
    python benchmarks/make_random_checkpoint.py --shape llama2-7b --out /scratch/random-llama2-7b --shard-gb 2 --dtype bfloat16
    python benchmarks/replaceme_cost.py --checkpoint /scratch/random-llama2-7b --hardware sequential --calib 8x512 \\
        --start 1 --num-remove 2 --repeats 2 --out benchmarks/results/replaceme_cost_llama2-7b_cpu.json

What is timed is the estimation the method runs after choosing the block: the calibration blocks through
layers ``0 .. start + num_remove - 1`` with the fold layer's MLP output tapped
(:func:`layerfold.methods.replaceme.stream_window`, which adds every batch into the float64 normal
equations), then the solve (``(XᵀX)^-1 XᵀY``, Cholesky, float64). Selection (which reads the capture
statistics) and the fold (one ``d x d_ff`` product) are not in it. ``--hardware resident`` loads the
checkpoint whole and streams ``--batch-size`` sequences at a time; ``sequential`` reads one decoder layer
at a time from the safetensors shards (``hardware=sequential``), every sequence's boundary held at once.

Each setting: ``--warmup`` untimed runs, then ``--repeats`` timed ones (median, min, max). Memory: the
process's resident set size sampled every 10 ms during each timed run, minus its size when the run
started (``host_mib_added``), and the peak itself; on CUDA the peak allocated memory. The normal
equations alone are ``2 d^2`` float64 numbers (``equations_mib``), whatever the calibration size.
"""

from __future__ import annotations

import argparse
import re
import threading
import time
from pathlib import Path

import psutil
import torch
from common import Timing, environment, row, shown, write_result

from transformers import AutoConfig

from layerfold.capture.linear_fit import PRODUCT_DTYPES
from layerfold.execution import SafetensorsLayerLoader
from layerfold.methods import MethodContext
from layerfold.methods.replaceme import WindowFit, stream_window
from layerfold.models import load_checkpoint, resolve_device, resolve_dtype

RESULTS = Path(__file__).resolve().parent / "results"


class RssPeak:
    """Peak resident set size of this process while a block runs, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        self.process, self.interval = psutil.Process(), interval
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="HF checkpoint directory (safetensors)")
    parser.add_argument("--hardware", default="resident", choices=["resident", "sequential"])
    parser.add_argument("--calib", default="32x256", help="comma-separated NxT calibration sizes (N sequences of T tokens)")
    parser.add_argument("--start", type=int, default=None, help="first removed layer (default: the middle of the stack)")
    parser.add_argument("--num-remove", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward (resident) or per layer call (sequential)")
    parser.add_argument("--product-dtype", default="float64", choices=list(PRODUCT_DTYPES))
    parser.add_argument("--ridge", type=float, default=0.0, help="(XᵀX + ridge I): needed when the calibration has fewer tokens than d")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes = []
    for item in args.calib.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)", item.strip())
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 2:
            raise SystemExit(f"--calib {item!r} is not NxT with N >= 1 sequences of T >= 2 tokens, e.g. 32x256.")
        sizes.append((int(match.group(1)), int(match.group(2))))
    args.calib = sizes
    return args


def context(args: argparse.Namespace, blocks: torch.Tensor, device: torch.device, dtype: torch.dtype) -> tuple[MethodContext, object]:
    if args.hardware == "resident":
        model, _ = load_checkpoint(args.checkpoint, device, dtype)
        return MethodContext(model, None, blocks, batch_size=args.batch_size), model
    hardware = {"mode": "sequential", "activations": "auto", "prefetch": device.type == "cuda", "batch_size": args.batch_size}
    loader = SafetensorsLayerLoader(args.checkpoint)
    return MethodContext.layer_major(loader, None, blocks, hardware, device, dtype, batch_size=args.batch_size), loader


def estimate(ctx: MethodContext, fold_layer: int, end: int, product_dtype: torch.dtype, device: torch.device,
             ridge: float) -> tuple[float, float, WindowFit]:
    """One estimation: ``(stream seconds, solve seconds, fit)``."""
    width = ctx.model.config.hidden_size
    fit = WindowFit(width, product_dtype)
    began = time.perf_counter()
    stream_window(ctx, fold_layer, end, fit)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    streamed = time.perf_counter() - began
    began = time.perf_counter()
    transform = fit.equations.solve(ridge)
    float(transform[0, 0])  # the solve has finished (a host read waits for the device)
    return streamed, time.perf_counter() - began, fit


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    rows, settings = [], []
    for sequences, tokens in args.calib:
        generator = torch.Generator().manual_seed(args.seed)
        config = AutoConfig.from_pretrained(args.checkpoint)
        blocks = torch.randint(0, config.vocab_size, (sequences, tokens), generator=generator)  # time and memory only
        ctx, holder = context(args, blocks, device, dtype)
        layers, width = ctx.num_layers, config.hidden_size
        start = args.start if args.start is not None else (layers - args.num_remove) // 2
        fold_layer, end = start - 1, start + args.num_remove
        if not 1 <= start <= layers - args.num_remove:
            raise SystemExit(f"--start {start} with --num-remove {args.num_remove} does not fit {layers} layers (1..{layers - args.num_remove}).")
        for _ in range(args.warmup):
            estimate(ctx, fold_layer, end, PRODUCT_DTYPES[args.product_dtype], device, args.ridge)
        streams, solves, added, peaks, gpu = [], [], [], [], []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with RssPeak() as rss:
                streamed, solved, fit = estimate(ctx, fold_layer, end, PRODUCT_DTYPES[args.product_dtype], device, args.ridge)
            streams.append(streamed)
            solves.append(solved)
            added.append((rss.peak - rss.start) / 2**20)
            peaks.append(rss.peak / 2**20)
            if device.type == "cuda":
                gpu.append(torch.cuda.max_memory_allocated(device) / 2**20)
        equations_mib = 2 * width * width * 8 / 2**20
        common = dict(device=device, hardware=args.hardware, calibration=f"{sequences}x{tokens}", layers_run=end, window=[start, end],
                      equations_mib=round(equations_mib, 1), host_mib_added=round(max(added), 1), host_mib_added_runs=[round(a, 1) for a in added],
                      peak_host_rss_mib=round(max(peaks), 1), peak_gpu_allocated_mib=round(max(gpu), 1) if gpu else None)
        rows.append(row(f"stream {sequences}x{tokens} ({args.hardware}, layers 0..{end - 1})", timing=Timing(streams),
                        tokens=sequences * tokens, seconds_per_layer=round(sorted(streams)[len(streams) // 2] / end, 4), **common))
        rows.append(row(f"solve {width}x{width} ({args.hardware})", timing=Timing(solves), **common))
        rows.append(row(f"estimation total {sequences}x{tokens} ({args.hardware})", timing=Timing([a + b for a, b in zip(streams, solves)]),
                        tokens=sequences * tokens, **common))
        settings.append({"calibration": [sequences, tokens], "start": start, "num_remove": args.num_remove, "fold_layer": fold_layer,
                         "tokens_added": fit.equations.tokens})
        del ctx, holder
    record = {
        "benchmark": "replaceme_cost",
        "environment": environment(device),
        "settings": {"checkpoint": shown(args.checkpoint), "hardware": args.hardware, "dtype": str(dtype).replace("torch.", ""),
                     "batch_size": args.batch_size, "product_dtype": args.product_dtype, "ridge": args.ridge, "warmup": args.warmup, "repeats": args.repeats,
                     "threads": torch.get_num_threads(), "runs": settings},
        "rows": rows,
        "notes": "Estimation only (selection and the fold excluded). seconds: median of the timed runs, with min and max. host_mib_added: "
                 "the largest rise of the process's RSS during a timed run over its size when the run started (sampled every 10 ms); "
                 "peak_host_rss_mib includes the model (resident) or the skeleton, embeddings and LM head (sequential).",
    }
    out = args.out or RESULTS / f"replaceme_cost_{device.type}.json"
    write_result(out, record)


if __name__ == "__main__":
    main()
