"""The end-to-end path of a model larger than one GPU, as ``sequential_70b.py --end-to-end WORK`` runs it.

Steps, each resumable (its result is written to ``WORK/<step>.json`` and a re-run skips steps already
done, so each fits a bounded command):

1. ``compress-<method>``: ShortGPT (Block Influence from a layer-major capture) and CoMe (channel
   statistics streamed per layer) compress the seeded random base layer by layer
   (:class:`layerfold.methods.MethodContext.layer_major`); the compressed checkpoint is written layer
   by layer to ``WORK/<method>`` (:func:`layerfold.execution.save_layerwise`).
2. ``heal-<method>``: ``torchrun --nproc_per_node N``: LoRA with the LM loss plus logit KD to the base,
   ``recovery.distributed=fsdp2``: the main process builds both models in host memory, the others on
   the meta device, and both are sharded one decoder layer per unit (:mod:`layerfold.recovery.distributed`).
   Tokens/s, MFU, peak GPU memory per process and the loss curve; the healed model is not saved
   unless ``--save-healed`` (disk: the base is generated, never written).
3. ``evaluate-<method>``: the lm-eval suite (local task files, ``--eval-limit`` documents per task)
   and the NLL of random windows, both layer by layer from the compressed checkpoint
   (:mod:`layerfold.evaluation.lm_eval_layerwise`), on one GPU.

Random weights and token ids: time and memory, never accuracy (the scores of a random model are chance).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import Timing, environment, llama_config, reset_peak_gpu, row

from layerfold.capture import BoundaryStatistics
from layerfold.evaluation.lm_eval_layerwise import LayerwiseModel
from layerfold.execution import (
    LayerMajorRunner,
    PlannedLayerLoader,
    SeededLayerLoader,
    TokenNLL,
    save_layerwise,
)
from layerfold.io import read_json, write_json

METHODS = {"shortgpt": "shortgpt", "come": "come"}
TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "mmlu"]


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("end to end (--end-to-end WORK)")
    group.add_argument("--end-to-end", type=Path, metavar="WORK", help="compress, heal (FSDP2) and evaluate, resumable in WORK")
    group.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    group.add_argument("--remove", type=int, default=16, help="layers removed by each method (default 16)")
    group.add_argument("--processes", type=int, default=8, help="GPUs for the FSDP2 healing (default 8)")
    group.add_argument("--heal-steps", type=int, default=10, help="optimiser steps of the healing run (default 10)")
    group.add_argument("--heal-batch", default="8x2048", help="global batch NxT of the healing run (default 8x2048)")
    group.add_argument("--eval-limit", type=int, default=100, help="documents per lm-eval task (default 100)")
    group.add_argument("--eval-tasks", nargs="+", default=TASKS)
    group.add_argument("--save-healed", action="store_true", help="also write the healed checkpoint (needs the disk)")
    group.add_argument("--heal-child", type=Path, help=argparse.SUPPRESS)


def _tokenizer(vocab: int) -> Any:
    from make_random_checkpoint import fitting_tokenizer

    return fitting_tokenizer(vocab, None)[1]


def _base(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> SeededLayerLoader:
    config = llama_config(args.shape, **({"num_hidden_layers": args.layers} if args.layers else {}))
    return SeededLayerLoader(config, seed=args.seed, dtype=dtype, generator_device=device.type)


def _hardware(args: argparse.Namespace) -> dict:
    return {"mode": "sequential", "activations": args.activations, "prefetch": not args.no_prefetch, "batch_size": args.batch_size,
            "activation_share": 0.5, "logits_chunk": args.logits_chunk, "eval_chunk_tokens": None}


def compress_step(args: argparse.Namespace, method: str, device: torch.device, dtype: torch.dtype) -> dict:
    from layerfold.methods import MethodContext, compress

    reset_peak_gpu(device)
    began = time.perf_counter()
    loader = _base(args, device, dtype)
    calib = torch.randint(0, loader.config.vocab_size, args.calib, generator=torch.Generator().manual_seed(args.seed + 1))
    stats = None
    if method == "shortgpt":
        run = LayerMajorRunner(loader, device, dtype, activations=args.activations, prefetch=not args.no_prefetch, batch_size=args.batch_size)
        stats = BoundaryStatistics(run.num_layers + 1, max_distance=1)
        run.run_layers(run.embed(calib), on_boundary=stats.add)
        del run
    ctx = MethodContext.layer_major(loader, None, calib, _hardware(args), device, dtype, stats, batch_size=args.batch_size, seed=args.seed)
    cfg = {"name": method, "num_remove": args.remove} if method == "shortgpt" else {"name": method, "num_remove": args.remove}
    plan = compress(ctx, cfg)
    searched = time.perf_counter() - began
    out = args.end_to_end / method
    tokenizer = _tokenizer(loader.config.vocab_size)
    save_layerwise(PlannedLayerLoader(loader, ctx.plan), tokenizer, out, dtype, dtype, extra_json={"plan.json": plan})
    seconds = time.perf_counter() - began
    return row(f"compress {method}", timing=Timing([seconds]), device=device, search_s=round(searched, 1), write_s=round(seconds - searched, 1),
               layers_after=len(plan["layers"]), merge_info=[layer["stands_for"] for layer in plan["layers"]], execution=ctx.stack.report.as_dict())


def heal_step(args: argparse.Namespace, method: str) -> dict:
    out = args.end_to_end / f"heal-{method}.child.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes), __file__.replace(
        "end_to_end_70b.py", "sequential_70b.py"), "--heal-child", str(out), "--end-to-end", str(args.end_to_end), "--methods", method,
        "--shape", args.shape, "--seed", str(args.seed), "--heal-steps", str(args.heal_steps), "--heal-batch", args.heal_batch,
        "--dtype", args.dtype, "--device", args.device] + (["--layers", str(args.layers)] if args.layers else []) + \
        (["--save-healed"] if args.save_healed else [])
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})
    if done.returncode:
        tail = (done.stdout[-1000:] + "\n" + done.stderr[-4000:]).strip()
        return {"name": f"heal {method}", "error": "out of memory" if "out of memory" in tail else "failed", "log_tail": tail[-4000:],
                "seconds": round(time.perf_counter() - began, 1)}
    return json.loads(out.read_text())


def heal_child(args: argparse.Namespace) -> None:
    """One process of the FSDP2 healing launch."""
    from omegaconf import OmegaConf

    from layerfold.config import RecoveryConfig, compose
    from layerfold.execution import materialise_model
    from layerfold.models.sources import resolve_device, resolve_dtype
    from layerfold.recovery import RecoveryEngine
    from layerfold.recovery.distributed import (
        is_main_process,
        launched_processes,
        load_for_launch,
        process_device,
    )

    method = args.methods[0]
    device = process_device(resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    processes = launched_processes()
    repo = Path(__file__).resolve().parents[1]
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(repo / "conf", ["recovery=lora"])["recovery"])
    sequences, seq_len = (int(v) for v in args.heal_batch.split("x"))
    cfg.merge_with({"distributed": "fsdp2", "end_to_end": {"lm_weight": 1.0, "kd_weight": 1.0}, "max_steps": args.heal_steps,
                    "batch_size": 1, "grad_accum": sequences, "log_every": 1, "checkpoint_every": 10**6, "warmup_ratio": 0.0,
                    "data": {"seq_len": seq_len}})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = _base(args, device, dtype)
    if processes == 1 or is_main_process():
        teacher = materialise_model(base, "cpu" if processes > 1 else device, dtype).eval()
    else:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            teacher = AutoModelForCausalLM.from_config(base.config, dtype=dtype).eval()
    teacher.requires_grad_(False)
    student, tokenizer = load_for_launch(args.end_to_end / method, device, torch.float32, cfg, processes)
    plan = read_json(args.end_to_end / method / "plan.json")
    vocab = base.config.vocab_size
    blocks = torch.randint(0, vocab, (args.heal_steps * sequences, seq_len), generator=torch.Generator().manual_seed(args.seed + 5))
    val = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(args.seed + 6))
    ends: list[float] = []
    engine = RecoveryEngine(student, teacher, plan, cfg, blocks, val, progress=False, train_device=device,
                            on_step=lambda phase, step: ends.append(time.perf_counter()))
    model, summary = engine.run()
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    peaks = engine.per_process(peak)
    if model is not None and args.save_healed:
        from layerfold.models import save_checkpoint

        save_checkpoint(model, tokenizer, args.end_to_end / f"{method}-healed", dtype=dtype)
    if not engine.accelerator.is_main_process:
        return
    steps = [b - a for a, b in zip(ends, ends[1:])][1:] or [b - a for a, b in zip(ends, ends[1:])]
    phase = summary["phases"][-1]
    tokens = sequences * seq_len
    record = row(f"heal {method}", timing=Timing(steps), tokens=tokens, flops=phase["flops"] / phase["tokens"] * tokens / processes,
                 device=device, processes=processes, distributed=summary["distributed"], precision=summary["precision"],
                 peak_gpu_mib_per_process=peaks, losses=[p["loss"] for p in engine.curve], trained_parameters=summary["trained_parameters"])
    Path(args.heal_child).write_text(json.dumps(record) + "\n")


def evaluate_step(args: argparse.Namespace, method: str, device: torch.device, dtype: torch.dtype) -> dict:
    from transformers import AutoTokenizer

    from layerfold.data.benchmarks import prepare_benchmarks
    from layerfold.evaluation.runner import LmEvalRunner
    from layerfold.evaluation.task_configs import write_task_configs
    from layerfold.execution import SafetensorsLayerLoader

    reset_peak_gpu(device)
    began = time.perf_counter()
    checkpoint = args.end_to_end / method
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    loader = SafetensorsLayerLoader(checkpoint)
    windows = torch.randint(0, loader.config.vocab_size, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(args.seed + 2))
    run = LayerMajorRunner(loader, device, dtype, activations=args.activations, prefetch=not args.no_prefetch, batch_size=args.batch_size)
    acts = run.embed(windows)
    head = TokenNLL(run.final_norm(), run.lm_head(), acts, run.num_layers, args.logits_chunk)
    run.run_layers(acts, on_boundary=head)
    nll_s = time.perf_counter() - began
    del run, acts
    data = Path(os.environ.get("LAYERFOLD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    suite = {}
    if data.is_dir():
        bench = args.end_to_end / "bench"
        prepare_benchmarks(data, bench, args.eval_tasks)
        task_dir = write_task_configs(bench, bench / "tasks")
        runner = LmEvalRunner(args.eval_tasks, {"mmlu": 5}, task_dir, limit=args.eval_limit, seed=args.seed, bootstrap_iters=100, cache_dir=None)
        source = LayerwiseModel.from_checkpoint(checkpoint, _hardware(args), device, dtype)
        scores = runner.evaluate(source, tokenizer, batch_size=32, max_length=2048)
        suite = {task: {"acc": scores[task].get("acc"), "acc_stderr": scores[task].get("acc_stderr"), "n": scores[task].get("n")}
                 for task in scores}
    seconds = time.perf_counter() - began
    return row(f"evaluate {method}", timing=Timing([seconds]), device=device, nll_windows_s=round(nll_s, 1),
               perplexity_random_windows=round(float(torch.tensor(head.nll / head.count).exp()), 3), lm_eval=suite,
               lm_eval_s=round(seconds - nll_s, 1), eval_limit=args.eval_limit, data_dir_found=data.is_dir())


def run_end_to_end(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    work = args.end_to_end
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        for step, fn in (("compress", lambda: compress_step(args, method, device, dtype)), ("heal", lambda: heal_step(args, method)),
                         ("evaluate", lambda: evaluate_step(args, method, device, dtype))):
            done = work / f"{step}-{method}.json"
            if not done.exists():
                print(f"{step} {method} ...", flush=True)
                write_json(done, fn())
            rows.append(read_json(done))
    record = {"benchmark": "sequential_70b_end_to_end", "environment": environment(device),
              "settings": {"shape": args.shape, "layers": args.layers, "remove": args.remove, "processes": args.processes,
                           "heal_steps": args.heal_steps, "heal_batch": args.heal_batch, "eval_limit": args.eval_limit,
                           "eval_tasks": args.eval_tasks, "calib": "x".join(map(str, args.calib)), "seed": args.seed,
                           "weights": "seeded random (never accuracy)"},
              "rows": rows}
    return record
