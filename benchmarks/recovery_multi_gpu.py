"""Benchmark: the recovery engine on 1, 2, ... processes with the same global batch: per-step losses, their
largest difference from the fewest processes that ran, tokens/s, MFU and peak GPU memory per process.

    python benchmarks/recovery_multi_gpu.py                      # CUDA, 2 GPUs: writes benchmarks/results/recovery_multi_gpu.json
    python benchmarks/recovery_multi_gpu.py --tiny               # CPU smoke run (gloo), tiny random Llama
    python benchmarks/recovery_multi_gpu.py --shape llama3-8b --processes 1 2 4 8 --modes lora_kd kd_all \
        --out benchmarks/results/recovery_fsdp2_llama3_8b.json   # FSDP2 scaling, 8 GPUs (one command)

``--shape`` (one of ``benchmarks/common.py``'s SHAPES) builds random weights of that shape instead of
SmolLM2's. The ``lora_kd`` and ``kd_all`` modes set ``recovery.distributed=fsdp2``: only the main process
builds the models (in host memory; the others on the meta device) and both the student and the frozen
teacher are sharded one decoder layer per unit, as for a model that does not fit one GPU. A launch that
fails (e.g. out of memory on one GPU: a Llama-3-8B student trained end to end needs ~128 GB of fp32
weights, gradients and AdamW state before the teacher) is recorded as a row with its error, and the
other process counts still run.

Each mode trains the same student from the same weights on the same blocks for ``--steps`` optimiser
steps of ``--global-batch`` sequences, once under ``torchrun --nproc_per_node 1`` and once under
``--nproc_per_node 2`` (each a fresh launch, so peak memory is that mode's own). Two processes run half
of every step's micro-batches each (``recovery.grad_accum`` counts them over all processes), so the two
curves should agree up to the order of floating-point reductions (bf16 autocast on CUDA).

Modes (``--modes``): ``distill`` (layer-local MSE on the layer standing for the removed block: DDP on
that layer), ``lora`` (LoRA on every layer, LM loss: DDP), ``lm_all`` (every decoder layer trained end to
end on the LM loss: FSDP2 on GPUs, DDP on CPUs, which accelerate cannot shard), ``lora_kd`` (LoRA on every
layer, LM loss + logit KD, both models sharded by FSDP2) and ``kd_all`` (every decoder layer trained on
logit KD alone, both models sharded by FSDP2).

Model: ``artifacts/base`` with ``artifacts/compressed`` (and its plan.json) when both exist; otherwise
SmolLM2-135M-shaped random weights (its published config) with ``--remove`` layers dropped from the
middle, as ShortGPT would leave it: real time and memory, no accuracy. Training blocks are seeded
random tokens (throughput and equivalence do not depend on the text). Step time is the time between
consecutive optimiser steps after ``--warmup`` steps; tokens/s and MFU count every process's tokens,
MFU against the peak of all the processes' GPUs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import SHAPES, Timing, environment, row, write_result

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
# SmolLM2-135M(-Instruct)'s published config.json (a Llama).
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
MODES = {
    "distill": {"recovery": "distill"},
    "lora": {"recovery": "lora"},
    "lm_all": {"recovery": "lm", "trainable": "layers"},
    "lora_kd": {"recovery": "lora", "distributed": "fsdp2", "end_to_end": {"lm_weight": 1.0, "kd_weight": 1.0}},
    "kd_all": {"recovery": "lm", "trainable": "layers", "distributed": "fsdp2", "end_to_end": {"lm_weight": 0.0, "kd_weight": 1.0}},
}
SHARDED = ("lora_kd", "kd_all")  # modes whose models are built by the main process only and sharded


# -- one launch (every process runs this) ----------------------------------------------------------------------------
def models(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, dict, str]:
    """Teacher, student, plan and a description, the same in every process."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from layerfold.io import read_json
    from layerfold.models import load_checkpoint
    from layerfold.models.adapters import get_adapter
    from layerfold.surgery import LayerPlan, remove_layers

    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base, compressed = REPO / "artifacts/base", REPO / "artifacts/compressed"
    if not args.tiny and (base / "config.json").exists() and (compressed / "plan.json").exists():
        teacher, _ = load_checkpoint(base, device, teacher_dtype)
        student, _ = load_checkpoint(compressed, device, torch.float32)
        return teacher, student, read_json(compressed / "plan.json"), f"{base} -> {compressed}"
    torch.manual_seed(0)
    shape = TINY if args.tiny else (SHAPES[args.shape] if args.shape else SMOLLM2_135M)
    config = LlamaConfig(**shape)
    if args.mode in SHARDED and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # as layerfold.recovery.distributed.load_for_launch: the main process builds the models in host memory, the
        # others only their structure (meta parameters); the engine shards both from the main process's copy
        if int(os.environ.get("RANK", "0")) == 0:
            teacher = AutoModelForCausalLM.from_config(config, dtype=teacher_dtype).eval()
            student = copy.deepcopy(teacher).float()
        else:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                teacher = AutoModelForCausalLM.from_config(config, dtype=teacher_dtype).eval()
                student = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    else:
        teacher = AutoModelForCausalLM.from_config(config).to(device, teacher_dtype).eval()
        student = copy.deepcopy(teacher).float()
    layers = get_adapter(teacher).num_layers(teacher)
    start = (layers - args.remove) // 2
    removed = list(range(start, start + args.remove))
    plan = LayerPlan(layers)
    remove_layers(student, removed)
    plan.remove(removed)
    name = "tiny random Llama" if args.tiny else (f"{args.shape}-shaped random Llama" if args.shape else "SmolLM2-135M-shaped random Llama")
    return teacher, student, {**plan.to_json(), "details": {}}, f"{name}, layers {removed[0]}-{removed[-1]} of {layers} removed"


def one_launch(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from layerfold.config import RecoveryConfig, compose
    from layerfold.models.sources import resolve_device
    from layerfold.recovery import RecoveryEngine
    from layerfold.recovery.distributed import process_device

    device = process_device(resolve_device("cpu" if args.tiny else "auto"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    teacher, student, plan, described = models(args, device)
    teacher.requires_grad_(False)
    mode = MODES[args.mode]
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(REPO / "conf", [f"recovery={mode['recovery']}"])["recovery"])
    cfg.merge_with({key: mode[key] for key in ("distributed", "end_to_end") if key in mode})
    cfg.merge_with({
        "trainable": mode.get("trainable", cfg.trainable), "max_steps": args.steps, "batch_size": args.micro_batch,
        "grad_accum": args.global_batch // args.micro_batch, "lr": 1e-4, "min_lr": 1e-5, "warmup_ratio": 0.0,
        "log_every": 1, "checkpoint_every": 10**6, "data": {"seq_len": args.seq_len},
    })
    vocab = teacher.config.vocab_size
    blocks = torch.randint(0, vocab, (args.steps * args.global_batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    val = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=torch.Generator().manual_seed(2))
    step_ends: list[float] = []
    engine = RecoveryEngine(student, teacher, plan, cfg, blocks, val, progress=False, train_device=device,
                            on_step=lambda phase, step: step_ends.append(time.perf_counter()))
    _, summary = engine.run()
    phase = summary["phases"][-1]
    peaks = engine.per_process(round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None)
    if not engine.accelerator.is_main_process:
        return
    steps = [b - a for a, b in zip(step_ends, step_ends[1:])][args.warmup:]
    tokens_per_step = args.global_batch * args.seq_len
    processes = summary["processes"]
    # row() takes one device's FLOPs for its MFU: each process does 1/N of the step's work.
    record = row(f"{args.mode} x{processes}", timing=Timing(steps), tokens=tokens_per_step,
                 flops=phase["flops"] / phase["tokens"] * tokens_per_step / processes, device=device,
                 processes=processes, distributed=summary["distributed"], precision=summary["precision"],
                 peak_gpu_mib_per_process=peaks, losses=[p["loss"] for p in engine.curve], model=described)
    Path(args.child_out).write_text(json.dumps(record) + "\n")


# -- the parent: one launch per mode and process count ---------------------------------------------------------------
def launch(args: argparse.Namespace, mode: str, processes: int, out: Path) -> dict:
    """One fresh launch of ``processes`` processes; a failed launch is a row with its error (the log's tail)."""
    child_out = out / f"{mode}-{processes}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), __file__,
               "--child-out", str(child_out), "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len),
               "--remove", str(args.remove)] + (["--tiny"] if args.tiny else []) + (["--shape", args.shape] if args.shape else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.tiny else dict(os.environ)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        tail = (done.stdout[-1000:] + "\n" + done.stderr[-3000:]).strip()
        print(f"{mode} x{processes}: FAILED after {seconds:.0f} s\n{tail[-1500:]}", flush=True)
        error = "out of memory" if "OutOfMemoryError" in tail or "out of memory" in tail else "failed"
        return {"name": f"{mode} x{processes}", "processes": processes, "error": error, "log_tail": tail[-3000:]}
    print(f"{mode} x{processes}: {seconds:.0f} s", flush=True)
    return json.loads(child_out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny random Llama, gloo")
    parser.add_argument("--modes", nargs="+", default=["distill", "lora", "lm_all"], choices=list(MODES))
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2], help="process counts, one launch each (default 1 2)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape (default SmolLM2-135M's)")
    parser.add_argument("--steps", type=int, help="optimiser steps per run (default 30 on CUDA, 6 with --tiny)")
    parser.add_argument("--warmup", type=int, help="steps left out of the timing (default 5, 1 with --tiny)")
    parser.add_argument("--global-batch", type=int, help="sequences per optimiser step over all processes (default 32, 8 with --tiny)")
    parser.add_argument("--micro-batch", type=int, help="sequences per forward (default 8, 2 with --tiny)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 512, 32 with --tiny)")
    parser.add_argument("--remove", type=int, help="layers dropped from the middle (random weights; default 8, 2 with --tiny)")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/recovery_multi_gpu[_cpu_tiny].json)")
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = dict(steps=6, warmup=1, global_batch=8, micro_batch=2, seq_len=32, remove=2) if args.tiny else \
        dict(steps=30, warmup=5, global_batch=32, micro_batch=8, seq_len=512, remove=8)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child_out:
        one_launch(args)
        return
    most = max(args.processes)
    if args.global_batch % (most * args.micro_batch):
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of {most} x --micro-batch {args.micro_batch}: "
                         f"{most} processes each run whole micro-batches of every step.")
    if args.steps <= args.warmup + 1:
        raise SystemExit(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}; raise --steps.")
    if not args.tiny and torch.cuda.device_count() < most:
        raise SystemExit(f"{torch.cuda.device_count()} CUDA device(s) visible; --processes {most} needs {most} (or use --tiny on CPU).")
    if args.tiny and any(m in SHARDED for m in args.modes) and most > 1:
        raise SystemExit("--modes lora_kd / kd_all shard with FSDP2, which accelerate runs on GPU processes only; on the CPU use --processes 1.")
    out = args.out or RESULTS / ("recovery_multi_gpu_cpu_tiny.json" if args.tiny else "recovery_multi_gpu.json")
    scratch = out.parent / f".{out.stem}.runs"
    scratch.mkdir(parents=True, exist_ok=True)
    rows, delta = [], {}
    for mode in args.modes:
        runs = [launch(args, mode, n, scratch) for n in args.processes]
        done = [r for r in runs if "error" not in r]
        reference = done[0] if done else None  # the fewest processes that ran
        for run in done[1:]:
            run["max_abs_delta_loss_vs_fewest"] = max(abs(a - b) for a, b in zip(reference["losses"], run["losses"]))
            run["speedup_over_fewest"] = round(run["tokens_per_s"] / reference["tokens_per_s"], 3)
            run["fewest_processes"] = reference["processes"]
        delta[mode] = max((r["max_abs_delta_loss_vs_fewest"] for r in done[1:]), default=None)
        rows += runs
    device = "cpu" if args.tiny else "cuda"
    record = {
        "benchmark": "recovery_multi_gpu",
        "environment": {**environment(device), "gpus": torch.cuda.device_count()},
        "settings": {"shape": args.shape or ("tiny" if args.tiny else "smollm2-135m"), "processes": args.processes, "steps": args.steps, "warmup_steps": args.warmup, "global_batch_sequences": args.global_batch,
                     "micro_batch": args.micro_batch, "seq_len": args.seq_len, "modes": {m: MODES[m] for m in args.modes},
                     "lr": 1e-4, "precision": "bf16 autocast, fp32 master weights" if device == "cuda" else "fp32"},
        "rows": rows,
        "max_abs_delta_loss": delta,
        "notes": "Per-step loss is the mean over processes of each process's micro-batch mean; xN runs 1/N of every "
                 "step's micro-batches per process (same samples, same order); deltas are against the fewest processes that ran. Peak GPU memory per process is each "
                 "launch's own high-water mark (CUDA max_memory_allocated).",
    }
    write_result(out, record)
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()


if __name__ == "__main__":
    main()
