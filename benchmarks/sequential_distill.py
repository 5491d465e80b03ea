"""Benchmark: LLM-Streamline's layer-local replacement training on a paper-scale shape, layer by layer, one GPU.

    python benchmarks/sequential_distill.py --shape llama3-70b --out benchmarks/results/sequential_distill_h100.json   # one H100
    python benchmarks/sequential_distill.py --shape llama2-7b --out benchmarks/results/sequential_distill_7b_h100.json
    python benchmarks/sequential_distill.py --shape tiny                                                              # CPU smoke run

What ``hardware=sequential`` gives the recover stage (:mod:`layerfold.recovery.layer_major`), on a
model that never exists as a whole: the teacher's layers are drawn per layer on the device by
``SeededLayerLoader``; the student is the teacher with a window of ``--window`` consecutive layers
replaced by one layer initialised from the window's first (Streamline's ``transformer_layer``: the
other layers of the window removed, a :class:`~layerfold.execution.PlannedLayerLoader` over the
teacher); ``recovery=distill`` trains that one layer on the MSE between its output and the teacher's
hidden state leaving the window, through the recovery engine's own loop. Rows:

0. ``parity``: on a small seeded model in float32, the span targets stored layer by layer (activations
   in pinned host memory) against the resident teacher's hooks on the same micro-batch, and the weights
   both runs train: the streams and copies the path relies on, checked on the device it runs on;
1. ``teacher targets``: the teacher run layer by layer over every training and validation block up to
   the window's end, keeping the two boundaries the span needs (plus the partial student's layer);
2. ``train step``: seconds per optimiser step (median over the steps after the first), tokens/s and MFU
   of the trained layer's forward and backward; peak GPU memory since the first LM-loss pass began (that
   pass resets the statistics; the ``lm loss pass`` row gives its own peak, so the larger is training's);
3. ``lm loss pass``: the validation LM loss of the student, layer by layer (before and after training);
4. ``total``: against one 80 GB GPU, a 128 GB host and 5 minutes.

Random weights and token ids (seeded): real time and memory, never accuracy.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import torch
from common import SHAPES, Timing, add_layer_major_args, environment, llama_config, peak_gpu_mib, reset_peak_gpu, row, write_result
from omegaconf import OmegaConf

from layerfold.config import RecoveryConfig, compose
from layerfold.execution import PlannedLayerLoader, SeededLayerLoader, WeightedLayerPlan, materialise_model
from layerfold.execution.loaders import meta_model
from layerfold.models import get_adapter, resolve_device, resolve_dtype
from layerfold.recovery import RecoveryEngine, Span
from layerfold.recovery.teacher import LiveTeacher
from layerfold.recovery.layer_major import StoredTargets, layer_major_engine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULTS = {"tiny": dict(train="8x32", val="2x32", steps=4, batch_size=2), "*": dict(train="32x2048", val="4x2048", steps=10, batch_size=4)}
TARGETS = dict(gpu_mib=80 * 1024, host_mib=128 * 1024, seconds=5 * 60)  # one 80 GB GPU, a 128 GB host, 5 minutes


def blocks_arg(text: str, name: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 2:
        raise SystemExit(f"--{name} {text!r} is not NxT with N >= 1 sequences of T >= 2 tokens, e.g. 32x2048.")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-70b", choices=sorted(SHAPES))
    parser.add_argument("--window", type=int, help="layers the replacement stands for (default: a quarter of the layers + 1, Streamline's 25%%)")
    parser.add_argument("--start", type=int, help="first layer of the window (default: the window ends one layer before the top)")
    parser.add_argument("--train", help="training blocks NxT (default 32x2048; tiny: 8x32)")
    parser.add_argument("--val", help="validation blocks NxT, same T (default 4x2048; tiny: 2x32)")
    parser.add_argument("--steps", type=int, help="optimiser steps (default 10; tiny: 4)")
    parser.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 4; tiny: 2)")
    add_layer_major_args(parser, "sequential_distill", "teacher dtype; auto: bf16 on CUDA, fp32 on CPU")
    args = parser.parse_args(argv)
    defaults = DEFAULTS.get(args.shape, DEFAULTS["*"])
    args.train = blocks_arg(args.train or defaults["train"], "train")
    args.val = blocks_arg(args.val or defaults["val"], "val")
    if args.train[1] != args.val[1]:
        raise SystemExit(f"--train and --val must share the sequence length (got {args.train[1]} and {args.val[1]}).")
    args.steps = args.steps or defaults["steps"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    if args.steps < 2 or args.batch_size < 1:
        raise SystemExit(f"--steps {args.steps} must be >= 2 (the first is warm-up) and --batch-size {args.batch_size} >= 1.")
    return args


def distill_cfg(steps: int, batch_size: int, seq_len: int) -> Any:
    """``recovery=distill`` (MSE, joint, trainable=new) for ``steps`` optimiser steps of one micro-batch each."""
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(REPO / "conf", ["recovery=distill"])["recovery"])
    cfg.merge_with({"max_steps": steps, "batch_size": batch_size, "grad_accum": 1, "log_every": 1, "checkpoint_every": 10**6,
                    "eval_every": 0, "data": {"seq_len": seq_len}})
    return cfg


def streamline_plan(layers: int, start: int, window: int) -> WeightedLayerPlan:
    """The window's first layer stays (the replacement's initialisation) and stands in for the whole window."""
    plan = WeightedLayerPlan(layers)
    plan.remove(range(start + 1, start + window))
    return plan


def random_ids(shape: tuple[int, int], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def layer_params(config: Any) -> int:
    model = meta_model(config)
    return sum(p.numel() for p in get_adapter(model).get_layers(model)[0].parameters())


def parity_row(device: torch.device, seed: int) -> dict[str, Any]:
    """Stored (host-placed) span targets against the live teacher's, and the weights each trains, on a small fp32 model."""
    reset_peak_gpu(device)
    began = time.perf_counter()
    teacher_loader = SeededLayerLoader(llama_config("tiny", num_hidden_layers=6), seed=seed, dtype=torch.float32)
    plan = streamline_plan(6, 1, 3)
    student_loader = PlannedLayerLoader(teacher_loader, plan)
    train, val = random_ids((6, 32), 512, seed + 1), random_ids((2, 32), 512, seed + 2)
    cfg = distill_cfg(4, 2, 32)
    cfg.precision = "fp32"
    hardware = {"mode": "sequential", "activations": "host", "prefetch": True}
    teacher = materialise_model(teacher_loader, device, torch.float32).eval().requires_grad_(False)
    span = Span(1, 1, 4)
    stored = StoredTargets.compute(teacher_loader, [span], train, val, hardware, device, torch.float32, 2)
    rows = torch.tensor([4, 1])
    live_in, live_out = LiveTeacher(teacher).fetch("train", rows, train[rows].to(device), [span])
    kept_in, kept_out = stored.fetch("train", rows, train[rows].to(device), [span])
    targets = max(float((kept_in[1][0] - live_in[1][0]).abs().max() / live_in[1][0].abs().max()),
                  float((kept_out[4] - live_out[4]).abs().max() / live_out[4].abs().max()))
    resident = RecoveryEngine(materialise_model(student_loader, device, torch.float32), teacher, plan.to_json(), cfg, train, val, progress=False)
    reference, _ = resident.run()
    model, _ = layer_major_engine(teacher_loader, student_loader, plan.to_json(), cfg, train, val, hardware, device, torch.float32, progress=False).run()
    initial = student_loader.load_layer(1, device, torch.float32)
    trained = get_adapter(model).get_layers(model)[1].state_dict()
    wanted = get_adapter(reference).get_layers(reference)[1].state_dict()
    update = sum(float((wanted[k] - initial[k]).norm() ** 2) for k in wanted) ** 0.5
    weights = sum(float((trained[k] - wanted[k]).norm() ** 2) for k in wanted) ** 0.5 / update
    return row("parity", timing=Timing([time.perf_counter() - began]), device=device,
               target="stored targets within 1e-5 of the live teacher's, trained weights within 1e-3 of the update", met=targets <= 1e-5 and weights <= 1e-3,
               targets_max_rel_diff=targets, weights_rel_diff=weights)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = llama_config(args.shape)
    layers = config.num_hidden_layers
    window = args.window or layers // 4 + 1
    start = layers - window - 1 if args.start is None else args.start
    if not (2 <= window and 0 <= start and start + window <= layers):
        raise SystemExit(f"--window {window} from --start {start} does not fit {layers} layers (need window >= 2 inside the stack).")
    if max(args.train[1], args.val[1]) > config.max_position_embeddings:
        raise SystemExit(f"Sequences of {args.train[1]} tokens exceed the model's context of {config.max_position_embeddings}.")
    teacher = SeededLayerLoader(config, seed=args.seed, dtype=dtype)
    plan = streamline_plan(layers, start, window)
    student = PlannedLayerLoader(teacher, plan)
    train = random_ids(args.train, config.vocab_size, args.seed + 1)
    val = random_ids(args.val, config.vocab_size, args.seed + 2)
    cfg = distill_cfg(args.steps, args.batch_size, args.train[1])
    hardware = {"mode": "sequential", "activations": args.activations, "prefetch": not args.no_prefetch}
    per_layer = layer_params(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights_mib = per_layer * layers * itemsize / 2**20  # decoder layers only: what a resident teacher would hold
    print(f"{args.shape}: {layers} layers ({weights_mib / 1024:.1f} GiB of decoder weights, never resident); replacing layers "
          f"{start}..{start + window - 1} by one, {args.steps} steps of {args.batch_size}x{args.train[1]} tokens", flush=True)

    started = time.perf_counter()
    rows = [parity_row(device, args.seed)]
    reset_peak_gpu(device)
    began = time.perf_counter()
    step_ends: list[float] = []
    step_peaks: list[float] = []

    def on_step(phase: str, step: int) -> None:
        step_ends.append(time.perf_counter())
        peak = peak_gpu_mib(device)
        if peak is not None:
            step_peaks.append(peak)

    engine = layer_major_engine(teacher, student, plan.to_json(), cfg, train, val, hardware, device, dtype, progress=False, on_step=on_step)
    teacher_s = time.perf_counter() - began
    targets = engine.targets.execution
    teacher_tokens = train.numel() + val.numel()
    teacher_flops = 2 * per_layer * (start + window) * teacher_tokens
    rows.append(row("teacher targets", timing=Timing([teacher_s]), tokens=teacher_tokens, flops=teacher_flops, device=device,
                    weights_mib=weights_mib, layers_run=targets["layers_run"], stored_boundaries=targets["stored_boundaries"],
                    stored_activations=targets["stored_activations"], stored_mib=targets["stored_mib"], execution=targets))

    _, summary = engine.run()
    phase = summary["phases"][0]
    steps = [b - a for a, b in zip(step_ends, step_ends[1:])]  # the first step (warm-up) has no start mark
    step_tokens = args.batch_size * args.train[1]
    step_flops = 6 * per_layer * step_tokens
    rows.append(row("train step", timing=Timing(steps), tokens=step_tokens, flops=step_flops, device=device, weights_mib=weights_mib,
                    peak_gpu_mib=max(step_peaks) if step_peaks else None, steps=phase["steps"], trained_parameters=summary["trained_parameters"],
                    loss_first=engine.curve[0]["loss"], loss_last=engine.curve[-1]["loss"], val_before=phase["val_before"], val_after=phase["val_after"]))
    passes = engine.lm_loss.passes
    rows.append(row("lm loss pass", timing=Timing([p["seconds"] for p in passes]), tokens=val.numel(), device=device, weights_mib=weights_mib,
                    peak_gpu_mib=max((p["peak_gpu_mib"] or 0) for p in passes) if device.type == "cuda" else None,
                    layers_run=passes[0]["layers_run"], val_lm_loss_before=summary["val_lm_loss_before"],
                    val_lm_loss_after=summary["val_lm_loss_after"]))

    total = time.perf_counter() - started
    peak_gpu = max((r["peak_gpu_mib"] or 0) for r in rows)
    peak_host = max(r["peak_host_mib"] for r in rows)
    met = all(r["met"] for r in rows if "met" in r) and peak_gpu <= TARGETS["gpu_mib"] and peak_host <= TARGETS["host_mib"] and total <= TARGETS["seconds"]
    rows.append(row("total", timing=Timing([total]), device=device, weights_mib=weights_mib,
                    target="parity met, peak GPU <= 80 GiB, peak host <= 128 GiB, <= 300 s", met=met, peak_gpu_mib=peak_gpu or None))
    step = rows[2]
    notes = (
        f"{args.shape} ({layers} layers, {weights_mib / 1024:.1f} GiB of decoder weights) never resident: teacher targets for "
        f"{teacher_tokens} tokens over {targets['layers_run']} layers in {teacher_s:.1f} s (boundaries {targets['stored_boundaries']} kept, "
        f"{targets['stored_mib']:.0f} MiB, {targets['stored_activations']}); one replacement layer ({summary['trained_parameters']:,} parameters, "
        f"float32 master weights{', bf16 autocast' if device.type == 'cuda' else ''}) trained {phase['steps']} steps at "
        f"{step['seconds']:.3f} s/step median ({step.get('tokens_per_s')} tokens/s, MFU {step.get('mfu')}); MFU counts 6 x layer parameters "
        f"per token, attention scores left out. Peak GPU {f'{peak_gpu / 1024:.1f} GiB' if device.type == 'cuda' else 'n/a (CPU)'}, "
        f"peak host {peak_host / 1024:.1f} GiB, {total:.0f} s in all. "
        "Losses of random weights on random tokens carry no meaning."
    )
    settings = dict(shape=args.shape, layers=layers, hidden=config.hidden_size, window=window, start=start, span=[start, start + window],
                    train="x".join(map(str, args.train)), val="x".join(map(str, args.val)), steps=args.steps, batch_size=args.batch_size,
                    activations=args.activations, prefetch=not args.no_prefetch, teacher_dtype=str(dtype).replace("torch.", ""),
                    student_dtype="float32", precision=engine.precision, loss=cfg.local.loss, lr=cfg.lr, seed=args.seed,
                    weights="seeded random, generated per layer on the compute device", tokens="seeded random ids")
    record = {"benchmark": "sequential_distill", "environment": environment(device), "settings": settings, "rows": rows, "notes": notes}
    write_result(args.out or RESULTS / f"sequential_distill_{device.type}.json", record)
    return record


if __name__ == "__main__":
    main()
