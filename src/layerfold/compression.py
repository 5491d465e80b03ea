"""The compress stage's work: load the dense model (or read it layer by layer), run the configured method and
compensation, write the compressed checkpoint with its sealed plan, its model card and the stage's records.

``hardware=resident`` loads the whole model, lets the method edit it in place and saves it. Either way the
checkpoint and its ``plan.json`` are one atomic output, the plan sealed to the weights it describes
(:mod:`layerfold.models.fingerprint`; the recover stage checks the seal before training).
``hardware=sequential`` never holds the model: the method's trials run layer by layer
(:class:`layerfold.methods.MethodContext.layer_major`), and the compressed checkpoint is written one
layer at a time from the plan over the base checkpoint's shards (:func:`layerfold.execution.save_layerwise`),
the same files with the same tensors (LLM-Streamline's replacements included: the plan states their
re-initialisation, drawn from ``runtime.seed``). A method whose declaration (``MethodCapabilities.layer_major``) rules out
these settings layer by layer stops before anything loads.

Wall time (the method's and any a method reports under ``details["timings"]``), peak memory and the
device go to ``metrics/compress_time.json``: git ignores it and DVC lists it as a top-level metric, not an output,
and plan.json holds no times, so no hash in dvc.lock depends on the machine or the clock, and a re-run that
writes the same model and plan leaves dvc.lock, the report and everything else as they were.
"""


from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig

from layerfold import execution
from layerfold.capture import BoundaryStatistics
from layerfold.execution.checkpoint import save_layerwise
from layerfold.compensate import compress_and_compensate
from layerfold.io import read_json, write_json
from layerfold.methods import MethodContext, check_capture_reach, check_layer_major
from layerfold.models import describe, load_checkpoint, save_checkpoint
from layerfold.models.card import write_model_card
from layerfold.models.devices import device_name, host_peak_rss_mib
from layerfold.models.resources import guard
from layerfold.models.sources import PLAN_FILE, resolve_dtype
from layerfold.runtime import peak_memory_mib, reset_peak_memory
from layerfold.surgery.plan import describe_plan
from layerfold.tracking import init_run


def _timed_compress(ctx: MethodContext, method: Any, device: torch.device, compensation: Any = None) -> tuple[dict, dict]:
    """The plan, and the wall times: the whole method's ``seconds`` and any a method reports under
    ``details["timings"]``, taken out of the plan (plan.json holds no times, so the same edits write the same bytes)."""
    reset_peak_memory(device)
    began = time.perf_counter()
    plan = compress_and_compensate(ctx, method, compensation)  # the method, then `compensate` (none: the method alone)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    return plan, {"seconds": round(seconds, 3), **plan.get("details", {}).pop("timings", {})}


def compress_resident(base: Path, blocks: torch.Tensor, stats: BoundaryStatistics, method: Any, batch_size: int,
                      device: torch.device, dtype: torch.dtype, storage: torch.dtype, out: Path, seed: int = 0,
                      compensation: Any = None) -> tuple[dict, dict, dict]:
    """The whole model on ``device``, edited in place and saved with its plan (one atomic output):
    ``(plan, describe(model), timings)``.

    ``seed`` (``runtime.seed``) seeds the weights a method draws fresh (LLM-Streamline's swiglu replacement).
    """
    model, tokenizer = load_checkpoint(base, device, dtype)
    ctx = MethodContext(model, tokenizer, blocks, stats, batch_size=batch_size, seed=seed)
    plan, timings = _timed_compress(ctx, method, device, compensation)
    save_checkpoint(model, tokenizer, out, dtype=storage, plan=plan)
    return read_json(out / PLAN_FILE), describe(model), timings  # the plan as written: sealed to the checkpoint


def compress_layer_major(base: Path, blocks: torch.Tensor, stats: BoundaryStatistics, method: Any, hardware: Any, batch_size: int,
                         device: torch.device, dtype: torch.dtype, storage: torch.dtype, out: Path, seed: int = 0,
                      compensation: Any = None) -> tuple[dict, dict, dict]:
    """Trials layer by layer, the checkpoint written layer by layer with its plan: ``(plan, describe(skeleton), timings)``."""
    check_layer_major(method)  # before any weight is read
    loader = execution.SafetensorsLayerLoader(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ctx = MethodContext.layer_major(loader, tokenizer, blocks, hardware, device, dtype, stats, batch_size=batch_size, seed=seed)
    plan, timings = _timed_compress(ctx, method, device, compensation)
    generation = GenerationConfig.from_pretrained(base) if (base / "generation_config.json").exists() else None
    save_layerwise(execution.PlannedLayerLoader(loader, ctx.plan), tokenizer, out, dtype, storage,
                   generation_config=generation, plan=plan)
    logging.info("layer by layer: %s", ctx.stack.report.sentence())
    logging.debug("layer-by-layer cost: %s", ctx.stack.report.as_dict())
    return read_json(out / PLAN_FILE), describe(ctx.model), timings


def write_card(folder: Path, params: Any, plan: dict, summary: dict) -> None:
    """The compressed checkpoint's model card: written before evaluation, so it says where the metrics go."""
    model = params.model
    size = (f", parameters {summary['params_total'] / 1e6:.1f}M" if summary.get("params_total") else "")
    write_model_card(
        folder, title=f"{model.name}, {summary['layers_after']} of {summary['layers_before']} layers ({summary['method']})",
        path_hint=str(folder), method=plan["method"], plan_line=describe_plan(plan),
        base_model_id=model.id if model.source == "hub" else None,
        metrics=[f"layers {summary['layers_before']} -> {summary['layers_after']}{size} (`metrics/compress.json`)",
                 "accuracies and perplexity, once evaluated: `metrics/compressed.json`; the run's headline ± se and Δ vs dense: "
                 "`metrics/summary.json` and `reports/report.md`"],
    )


@dataclass(frozen=True)
class CompressPaths:
    """Where the stage reads and writes (the workspace's ``artifacts/`` and ``metrics/`` under DVC)."""

    base: Path
    calibration: Path
    capture: Path
    compressed: Path
    metrics: Path


def compress_stage(params: Any, device: torch.device, dtype: torch.dtype, paths: CompressPaths) -> dict:
    """Run the compress stage with checked ``params``; returns the summary written to ``metrics/compress.json``."""
    run = init_run(params, "compress")
    blocks = load_file(paths.calibration / "blocks.safetensors")["input_ids"]
    stats = BoundaryStatistics.from_tensors(load_file(paths.capture / "stats.safetensors"))
    check_capture_reach(params.method, stats.reach)  # the statistics hold the boundary pairs the method declares it reads
    storage = resolve_dtype(params.model.storage_dtype)
    batch_size, hardware, seed = params.capture.batch_size, params.hardware, params.runtime.seed
    if hardware.mode == "sequential":
        plan, facts, timings = compress_layer_major(paths.base, blocks, stats, params.method, hardware, batch_size,
                                                    device, dtype, storage, paths.compressed, seed=seed,
                                                    compensation=params.get("compensate"))
    else:
        # Iterative methods re-capture statistics of the current model, so the capture estimate applies.
        guard(paths.base, device, dtype, batch_size, blocks.shape[1], "capture.batch_size", all_boundaries=True)
        plan, facts, timings = compress_resident(paths.base, blocks, stats, params.method, batch_size, device, dtype, storage,
                                                 paths.compressed, seed=seed, compensation=params.get("compensate"))

    summary = {
        "method": plan["method"]["name"],
        "layers_before": plan["original_layers"],
        "layers_after": len(plan["layers"]),
        "removed": plan["removed"],
        "merged": plan["merged"],
        **{k: v for k, v in facts.items() if k.startswith("params_") and k != "params_per_layer"},
    }
    timing = {**timings, "peak_memory_mib": round(peak_memory_mib(device), 1), "device": device_name(device),
              "hardware": hardware.mode, "peak_host_mib": round(host_peak_rss_mib(), 1)}
    write_card(paths.compressed, params, plan, summary)
    write_json(paths.metrics / "compress.json", summary)
    write_json(paths.metrics / "compress_time.json", timing)
    run.log({f"compress/{k}": v for k, v in {**summary, **timing}.items() if isinstance(v, (int, float))})
    run.finish()
    # the whole plan is in artifacts/compressed/plan.json; the log names only what changed
    logging.info("%s: %d -> %d layers in %.1f s: %s (plan: %s)", summary["method"], summary["layers_before"], summary["layers_after"],
                 timings["seconds"], describe_plan(plan), paths.compressed / PLAN_FILE)
    return summary

