"""Benchmark: a Llama-3-70B-shaped model compressed and scored on one GPU by layer-major execution.

    python benchmarks/sequential_70b.py --shape llama3-70b --windows 16 --seq-len 2048 --calib 16x2048 \
        --out benchmarks/results/sequential_70b_h100.json                      # one H100 (80 GB)
    python benchmarks/sequential_70b.py --shape tiny --windows 2 --seq-len 64 --calib 2x64   # CPU smoke run
    python benchmarks/sequential_70b.py --checkpoint /tmp/random-llama2-7b --out ...        # weights read from disk
    python benchmarks/sequential_70b.py --shape llama3-70b --end-to-end /scratch/e2e --processes 8 \
        --out benchmarks/results/sequential_70b_end_to_end.json   # compress (ShortGPT, CoMe) layer by layer, heal with
                                                                   # FSDP2 on 8 GPUs, evaluate the suite layer by layer
                                                                   # (resumable: re-run the same command; end_to_end_70b.py)

The model never exists as a whole: every decoder layer is generated on the fly by
``layerfold.execution.SeededLayerLoader`` (weights drawn from a generator seeded per layer: a 140 GB
bf16 checkpoint fits neither the GPU nor a 64 GB scratch disk), run over every sequence, and freed.
With ``--checkpoint`` the layers are read from a checkpoint's safetensors shards instead
(``SafetensorsLayerLoader``; ``benchmarks/make_random_checkpoint.py`` writes a 7B one), and the
resident model is scored too, for comparison. Steps, each a row with its wall time, peak GPU memory
(reset per step) and the process's peak host RSS:

0. ``parity``: on a small seeded model in fp32, the NLL of layer-major execution with activations on
   the device, and in (pinned) host memory with prefetch, against the resident model: the CUDA
   streams and copies this benchmark relies on, checked on the device it runs on;
1. ``generate layer (<device>)``: one decoder layer's weights drawn on the GPU and on the CPU, to
   show which one would dominate a run (the CPU is timed once: it takes seconds per layer);
   ``read layer (disk)`` with ``--checkpoint``;
2. ``capture``: boundary statistics (token cosine of adjacent boundaries, ``max_distance=1``) over
   the calibration blocks, layer-major;
3. ``perplexity dense``: next-token NLL of the dense stack over the evaluation windows
   (``perplexity resident``: the same on the whole model, with ``--checkpoint``);
4. ``plan``: Block Influence from the statistics; remove the lowest-BI layer, merge the adjacent pair
   with the lowest summed BI among the rest (``0.5 * theta_l + 0.5 * theta_l+1``, MKA's form);
5. ``perplexity planned``: the compressed stack through ``PlannedLayerLoader`` (built per layer, never
   as a whole).

Random weights and random token ids (seeded): real time and memory, never accuracy; the perplexity of
a random model is only there to show the numbers stay finite and change with the plan.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from end_to_end_70b import add_args as add_end_to_end_args
from end_to_end_70b import heal_child, run_end_to_end
from common import SHAPES, Timing, add_layer_major_args, environment, forward_flops, llama_config, reset_peak_gpu, row, timed, write_result

from layerfold.capture import BoundaryStatistics
from layerfold.execution import (
    LayerLoader,
    LayerMajorRunner,
    PlannedLayerLoader,
    SafetensorsLayerLoader,
    SeededLayerLoader,
    TokenNLL,
    WeightedLayerPlan,
    materialise_model,
)
from layerfold.execution.loaders import meta_model
from layerfold.execution.loss import token_nll as resident_token_nll
from layerfold.models import get_adapter, load_checkpoint, resolve_device, resolve_dtype
from layerfold.models.devices import device_name, peak_flops
from layerfold.scoring.similarity import block_influence, lowest
from layerfold.surgery import weighted

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {"tiny": dict(windows=2, seq_len=64, calib="2x64"), "*": dict(windows=16, seq_len=2048, calib="16x2048")}
TARGETS = dict(gpu_mib=80 * 1024, host_mib=64 * 1024, seconds=8 * 60)  # one 80 GB GPU, a 64 GB host, one 8-minute command
ASSUMED_MFU = 0.4  # for the runtime estimate printed before the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--shape", default="llama3-70b", choices=sorted(SHAPES), help="seeded random weights of this shape (default llama3-70b)")
    source.add_argument("--checkpoint", type=Path, help="read the layers from this checkpoint directory instead")
    parser.add_argument("--windows", type=int, help="evaluation windows for perplexity (default 16; tiny: 2)")
    parser.add_argument("--seq-len", type=int, help="tokens per evaluation window (default 2048; tiny: 64)")
    parser.add_argument("--calib", help="calibration blocks NxT (default 16x2048; tiny: 2x64)")
    parser.add_argument("--layers", type=int, help="override the shape's number of layers (e.g. 80 for the tiny shape)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per decoder-layer call (default 4)")
    parser.add_argument("--logits-chunk", type=int, default=1024, help="tokens per LM-head chunk (default 1024)")
    add_layer_major_args(parser, "sequential_70b")
    add_end_to_end_args(parser)
    args = parser.parse_args(argv)
    defaults = DEFAULTS.get(args.shape if not args.checkpoint else "*", DEFAULTS["*"])
    args.windows = args.windows or defaults["windows"]
    args.seq_len = args.seq_len or defaults["seq_len"]
    match = re.fullmatch(r"(\d+)x(\d+)", args.calib or defaults["calib"])
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 2:
        raise SystemExit(f"--calib {args.calib!r} is not NxT with N >= 1 sequences of T >= 2 tokens, e.g. 16x2048.")
    args.calib = (int(match.group(1)), int(match.group(2)))
    if args.windows < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise SystemExit(f"--windows {args.windows}, --seq-len {args.seq_len}, --batch-size {args.batch_size} must be >= 1, >= 2, >= 1.")
    return args


@dataclass
class Setup:
    """What the run works on: the stack, its data, its size."""

    name: str
    loader: LayerLoader
    calib: torch.Tensor
    windows: torch.Tensor
    params_per_layer: list[int]
    weights_mib: float
    device: torch.device
    dtype: torch.dtype
    args: argparse.Namespace

    @property
    def config(self) -> Any:
        return self.loader.config

    def runner(self, loader: LayerLoader) -> LayerMajorRunner:
        return LayerMajorRunner(loader, self.device, self.dtype, activations=self.args.activations, prefetch=not self.args.no_prefetch,
                                batch_size=self.args.batch_size)


def random_ids(count: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(seed))


def make_setup(args: argparse.Namespace) -> Setup:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.checkpoint:
        loader: LayerLoader = SafetensorsLayerLoader(args.checkpoint)
        name = args.checkpoint.name
    else:
        loader = SeededLayerLoader(llama_config(args.shape, **({"num_hidden_layers": args.layers} if args.layers else {})), seed=args.seed, dtype=dtype)
        name = args.shape
    config = loader.config
    if max(args.seq_len, args.calib[1]) > config.max_position_embeddings:
        raise SystemExit(f"Sequences of {max(args.seq_len, args.calib[1])} tokens exceed the model's context of {config.max_position_embeddings}.")
    model = meta_model(config)
    params_per_layer = [sum(p.numel() for p in layer.parameters()) for layer in get_adapter(model).get_layers(model)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights_mib = sum(p.numel() for p in model.parameters()) * itemsize / 2**20
    calib = random_ids(*args.calib, config.vocab_size, args.seed + 1)
    windows = random_ids(args.windows, args.seq_len, config.vocab_size, args.seed + 2)
    return Setup(name, loader, calib, windows, params_per_layer, weights_mib, device, dtype, args)


def estimate_seconds(setup: Setup) -> float | None:
    """Compute-bound runtime of the three passes at ``ASSUMED_MFU`` of the device's bf16 peak (None off-GPU)."""
    peak = peak_flops(device_name(setup.device)) if setup.device.type == "cuda" else None
    if peak is None:
        return None
    body, layers, config, windows = sum(setup.params_per_layer), len(setup.params_per_layer), setup.config, setup.windows
    flops = forward_flops(body, setup.calib.numel(), layers, config.hidden_size, setup.calib.shape[1])
    flops += 2 * forward_flops(body, windows.numel(), layers, config.hidden_size, windows.shape[1], config.vocab_size,
                               windows.shape[0] * (windows.shape[1] - 1))
    return flops / (ASSUMED_MFU * peak)


def parity_row(device: torch.device, seed: int) -> dict[str, Any]:
    """Relative NLL differences of layer-major execution (device / host+prefetch activations) from the resident model, fp32."""
    reset_peak_gpu(device)
    began = time.perf_counter()
    loader = SeededLayerLoader(llama_config("tiny", num_hidden_layers=6), seed=seed, dtype=torch.float32)
    blocks = random_ids(6, 64, loader.config.vocab_size, seed + 3)
    reference, _ = resident_token_nll(materialise_model(loader, device, torch.float32).eval(), blocks, batch_size=2)
    differences = {}
    for activations, prefetch in (("device", False), ("host", True)):
        run = LayerMajorRunner(loader, device, torch.float32, activations=activations, prefetch=prefetch, batch_size=2)
        acts = run.embed(blocks)
        head = TokenNLL(run.final_norm(), run.lm_head(), acts, run.num_layers, chunk_tokens=50)
        run.run_layers(acts, on_boundary=head)
        differences[f"{activations}{'+prefetch' if prefetch else ''}"] = abs(head.nll - reference) / reference
    return row("parity", timing=Timing([time.perf_counter() - began]), device=device, target="relative NLL difference <= 1e-5",
               met=max(differences.values()) <= 1e-5, relative_nll_difference=differences)


def weight_rows(setup: Setup) -> list[dict[str, Any]]:
    """One layer's weights: read from disk, or generated on the compute device and on the CPU (which would dominate?)."""
    layer_mib = setup.params_per_layer[0] * torch.empty((), dtype=setup.dtype).element_size() / 2**20
    if setup.args.checkpoint:
        sources = {"disk": (setup.loader, setup.device.type)}
    else:
        sources = {where: (SeededLayerLoader(setup.config, seed=setup.args.seed, dtype=setup.dtype, generator_device=where), where)
                   for where in dict.fromkeys([setup.device.type, "cpu"])}
    rows = []
    for where, (loader, target) in sources.items():
        reset_peak_gpu(setup.device)
        once = where == "cpu" and setup.device.type != "cpu"  # seconds per layer: timed once
        timing = timed(lambda: loader.load_layer(0, target, setup.dtype), device=target, warmup=0 if once else 1, repeats=1 if once else 3)
        rows.append(row(f"{'read' if where == 'disk' else 'generate'} layer ({where})", timing=timing, device=setup.device,
                        layer_mib=round(layer_mib, 1), gib_per_s=round(layer_mib / 1024 / timing.median, 2),
                        whole_stack_s=round(timing.median * len(setup.params_per_layer), 2)))
    return rows


def capture_step(setup: Setup) -> tuple[dict[str, Any], BoundaryStatistics]:
    reset_peak_gpu(setup.device)
    began = time.perf_counter()
    run = setup.runner(setup.loader)
    stats = BoundaryStatistics(run.num_layers + 1, max_distance=1)
    acts = run.embed(setup.calib)
    run.run_layers(acts, on_boundary=stats.add)
    report = run.report.as_dict()
    del acts, run  # its embeddings and LM head (4 GiB at 70B) go before the next step builds its own
    seconds = time.perf_counter() - began
    flops = forward_flops(sum(setup.params_per_layer), setup.calib.numel(), len(setup.params_per_layer), setup.config.hidden_size,
                          setup.calib.shape[1])
    return row("capture", timing=Timing([seconds]), tokens=setup.calib.numel(), flops=flops, device=setup.device,
               weights_mib=setup.weights_mib, execution=report), stats


def perplexity_step(setup: Setup, loader: LayerLoader, name: str) -> tuple[dict[str, Any], float]:
    """Next-token NLL of ``loader``'s stack over the evaluation windows, layer-major; the row and the summed NLL."""
    reset_peak_gpu(setup.device)
    began = time.perf_counter()
    run = setup.runner(loader)
    acts = run.embed(setup.windows)
    head = TokenNLL(run.final_norm(), run.lm_head(), acts, run.num_layers, setup.args.logits_chunk)
    run.run_layers(acts, on_boundary=head)
    seconds = time.perf_counter() - began
    layers = setup.params_per_layer[: run.num_layers]
    flops = forward_flops(sum(layers), setup.windows.numel(), len(layers), setup.config.hidden_size, setup.windows.shape[1],
                          setup.config.vocab_size, head.count)
    return row(name, timing=Timing([seconds]), tokens=setup.windows.numel(), flops=flops, device=setup.device, weights_mib=setup.weights_mib,
               perplexity=round(math.exp(head.nll / head.count), 3), execution=run.report.as_dict()), head.nll


def resident_row(setup: Setup, layer_major_nll: float) -> dict[str, Any]:
    """The whole checkpoint on the device, batch by batch: the reference the layer-major NLL should match."""
    reset_peak_gpu(setup.device)
    began = time.perf_counter()
    model, _ = load_checkpoint(setup.args.checkpoint, setup.device, setup.dtype)
    nll, count = resident_token_nll(model, setup.windows, setup.args.batch_size)
    del model
    difference = abs(nll - layer_major_nll) / nll
    return row("perplexity resident", timing=Timing([time.perf_counter() - began]), tokens=setup.windows.numel(), device=setup.device,
               weights_mib=setup.weights_mib, perplexity=round(math.exp(nll / count), 3), relative_nll_difference=difference,
               target="layer-major NLL within 1e-3 of resident (bf16 kernels differ by batch shape)", met=difference <= 1e-3)


def choose_plan(bi: torch.Tensor) -> tuple[WeightedLayerPlan, int, int]:
    """Remove the lowest-BI layer; merge the adjacent pair (l, l + 1) with the lowest BI sum that does not touch it."""
    num_layers = len(bi)
    removed = lowest(bi, 1)[0]
    pairs = [l for l in range(num_layers - 1) if removed not in (l, l + 1)]
    merged = min(pairs, key=lambda l: float(bi[l] + bi[l + 1]))
    plan = WeightedLayerPlan(num_layers)
    plan.remove([removed])
    position = plan.groups.index([merged])
    plan.merge(position, [position + 1], weighted(0.5))
    return plan, removed, merged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.heal_child:
        heal_child(args)
        return {}
    if args.end_to_end:
        device = resolve_device(args.device)
        record = run_end_to_end(args, device, resolve_dtype(args.dtype, device))
        write_result(args.out or RESULTS / f"sequential_70b_end_to_end_{device.type}.json", record)
        return record
    setup = make_setup(args)
    config = setup.config
    estimate = estimate_seconds(setup)
    print(f"{setup.name}: {config.num_hidden_layers} layers, {setup.weights_mib / 1024:.1f} GiB of weights (never resident)"
          + (f"; compute estimate {estimate:.0f} s at {ASSUMED_MFU:.0%} MFU" if estimate else ""), flush=True)
    started = time.perf_counter()
    rows = [parity_row(setup.device, args.seed), *weight_rows(setup)]
    capture, stats = capture_step(setup)
    rows.append(capture)
    dense, dense_nll = perplexity_step(setup, setup.loader, "perplexity dense")
    rows.append(dense)
    if args.checkpoint:
        rows.append(resident_row(setup, dense_nll))
    began = time.perf_counter()
    bi = block_influence(stats.cosine)
    plan, removed, merged = choose_plan(bi)
    planned = PlannedLayerLoader(setup.loader, plan)
    rows.append(row("plan", timing=Timing([time.perf_counter() - began]), device=setup.device, removed_layer=removed,
                    merged_layers=[merged, merged + 1], layers_after=planned.num_layers))
    rows.append(perplexity_step(setup, planned, "perplexity planned")[0])

    total = time.perf_counter() - started
    peak_gpu = max((r["peak_gpu_mib"] or 0) for r in rows)
    peak_host = max(r["peak_host_mib"] for r in rows)
    checks = all(r["met"] for r in rows if "met" in r)
    met = checks and peak_gpu <= TARGETS["gpu_mib"] and peak_host <= TARGETS["host_mib"] and total <= TARGETS["seconds"]
    rows.append(row("total", timing=Timing([total]), device=setup.device, weights_mib=setup.weights_mib,
                    target="checks met, peak GPU <= 80 GiB, peak host <= 64 GiB, <= 480 s", met=met, peak_gpu_mib_any_step=peak_gpu,
                    estimate_s=round(estimate, 1) if estimate else None))
    perplexities = {r["name"]: r["perplexity"] for r in rows if "perplexity" in r}
    loads = ", ".join(f"{r['seconds']:.3f} s to {r['name'].replace(' layer', ' one layer')}" for r in rows if " layer (" in r["name"])
    notes = (
        f"{setup.name} ({config.num_hidden_layers} layers, {setup.weights_mib / 1024:.1f} GiB of weights) run layer by layer: peak GPU "
        f"{peak_gpu / 1024:.1f} GiB, peak host {peak_host / 1024:.1f} GiB, {total:.0f} s in all. Block Influence removed layer {removed} and "
        f"merged {merged}+{merged + 1}; perplexities of the random model {perplexities} (finite is the point, not the value). "
        f"{loads}; the three passes load {3 * config.num_hidden_layers} layers."
    )
    settings = dict(source=str(args.checkpoint) if args.checkpoint else f"seeded random {args.shape}, generated per layer on the compute device",
                    layers=config.num_hidden_layers, hidden=config.hidden_size, windows=args.windows, seq_len=args.seq_len,
                    calib="x".join(map(str, args.calib)), batch_size=args.batch_size, activations=args.activations,
                    prefetch=not args.no_prefetch, logits_chunk=args.logits_chunk, dtype=str(setup.dtype).replace("torch.", ""),
                    seed=args.seed, max_distance=1, tokens="seeded random ids")
    record = {"benchmark": "sequential_70b", "environment": environment(setup.device), "settings": settings, "rows": rows,
              "block_influence": [round(float(v), 6) for v in bi], "plan": plan.to_json(), "notes": notes}
    write_result(args.out or RESULTS / f"sequential_70b_{setup.device.type}.json", record)
    return record


if __name__ == "__main__":
    main()
