"""Stage `compress`: run the configured method on the dense model and save the result.

    dvc repro compress    # params: method, hardware  ->  artifacts/compressed/ (checkpoint + plan.json), metrics/compress.json

``hardware=resident`` loads the whole model, lets the method edit it in place and saves it.
``hardware=sequential`` never holds the model: the method's trials run layer by layer
(:class:`layerfold.methods.MethodContext.layer_major`), and the compressed checkpoint is written one
layer at a time from the plan over the base checkpoint's shards (:func:`layerfold.execution.save_layerwise`),
the same files with the same tensors (LLM-Streamline's replacements included: the plan states their
re-initialisation, drawn from ``runtime.seed``). A method that cannot run layer-major stops before anything loads.

Wall time, peak memory and the device go to metrics/compress_time.json, which no stage depends on: a
re-run that writes the same model and plan leaves the report and everything else up to date.
"""

import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig

from layerfold import execution
from layerfold.capture import BoundaryStatistics
from layerfold.evaluation.efficiency import device_name, peak_memory_mib, reset_peak_memory
from layerfold.execution.checkpoint import save_layerwise
from layerfold.io import write_json
from layerfold.compensate import compress_and_compensate
from layerfold.methods import MethodContext, check_layer_major
from layerfold.models import describe, load_checkpoint, save_checkpoint
from layerfold.models.devices import host_peak_rss_mib
from layerfold.models.resources import guard
from layerfold.models.sources import resolve_dtype
from layerfold.stage import BASE, CALIBRATION, COMPRESSED, CAPTURE, METRICS, start
from layerfold.tracking import init_run


def _timed_compress(ctx: MethodContext, method: Any, device: torch.device, compensation: Any = None) -> tuple[dict, float]:
    reset_peak_memory(device)
    began = time.perf_counter()
    plan = compress_and_compensate(ctx, method, compensation)  # the method, then `compensate` (none: the method alone)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return plan, time.perf_counter() - began


def compress_resident(base: Path, blocks: torch.Tensor, stats: BoundaryStatistics, method: Any, batch_size: int,
                      device: torch.device, dtype: torch.dtype, storage: torch.dtype, out: Path, seed: int = 0,
                      compensation: Any = None) -> tuple[dict, dict, float]:
    """The whole model on ``device``, edited in place and saved: ``(plan, describe(model), seconds)``.

    ``seed`` (``runtime.seed``) seeds the weights a method draws fresh (LLM-Streamline's swiglu replacement).
    """
    model, tokenizer = load_checkpoint(base, device, dtype)
    ctx = MethodContext(model, tokenizer, blocks, stats, batch_size=batch_size, seed=seed)
    plan, seconds = _timed_compress(ctx, method, device, compensation)
    save_checkpoint(model, tokenizer, out, dtype=storage)
    write_json(out / "plan.json", plan)
    return plan, describe(model), seconds


def compress_layer_major(base: Path, blocks: torch.Tensor, stats: BoundaryStatistics, method: Any, hardware: Any, batch_size: int,
                         device: torch.device, dtype: torch.dtype, storage: torch.dtype, out: Path, seed: int = 0,
                         compensation: Any = None) -> tuple[dict, dict, float]:
    """Trials layer by layer, the checkpoint written layer by layer: ``(plan, describe(skeleton), seconds)``."""
    check_layer_major(method)  # before any weight is read
    loader = execution.SafetensorsLayerLoader(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ctx = MethodContext.layer_major(loader, tokenizer, blocks, hardware, device, dtype, stats, batch_size=batch_size, seed=seed)
    plan, seconds = _timed_compress(ctx, method, device, compensation)
    generation = GenerationConfig.from_pretrained(base) if (base / "generation_config.json").exists() else None
    save_layerwise(execution.PlannedLayerLoader(loader, ctx.plan), tokenizer, out, dtype, storage,
                   generation_config=generation, extra_json={"plan.json": plan})
    logging.info("compress (sequential): %s", ctx.stack.report.as_dict())
    return plan, describe(ctx.model), seconds


def main() -> None:
    stage = start("compress")
    run = init_run(stage.params, "compress")
    blocks = load_file(CALIBRATION / "blocks.safetensors")["input_ids"]
    stats = BoundaryStatistics.from_tensors(load_file(CAPTURE / "stats.safetensors"))
    storage = resolve_dtype(stage.params.model.storage_dtype)
    batch_size, hardware, seed = stage.params.capture.batch_size, stage.params.hardware, stage.params.runtime.seed
    if hardware.mode == "sequential":
        plan, facts, seconds = compress_layer_major(BASE, blocks, stats, stage.params.method, hardware, batch_size,
                                                    stage.device, stage.dtype, storage, COMPRESSED, seed=seed,
                                                    compensation=stage.params.get("compensate"))
    else:
        # Iterative methods re-capture statistics of the current model, so the capture estimate applies.
        guard(BASE, stage.device, stage.dtype, batch_size, blocks.shape[1], "capture.batch_size", all_boundaries=True)
        plan, facts, seconds = compress_resident(BASE, blocks, stats, stage.params.method, batch_size, stage.device, stage.dtype, storage,
                                                 COMPRESSED, seed=seed, compensation=stage.params.get("compensate"))

    summary = {
        "method": plan["method"]["name"],
        "layers_before": plan["original_layers"],
        "layers_after": len(plan["layers"]),
        "removed": plan["removed"],
        "merged": plan["merged"],
        **{k: v for k, v in facts.items() if k.startswith("params_") and k != "params_per_layer"},
    }
    timing = {"seconds": round(seconds, 3), "peak_memory_mib": round(peak_memory_mib(stage.device), 1), "device": device_name(stage.device),
              "hardware": hardware.mode, "peak_host_mib": round(host_peak_rss_mib(), 1)}
    write_json(METRICS / "compress.json", summary)
    write_json(METRICS / "compress_time.json", timing)
    run.log({f"compress/{k}": v for k, v in {**summary, **timing}.items() if isinstance(v, (int, float))})
    run.finish()
    logging.info("%s: %d -> %d layers in %.1fs; plan: %s", summary["method"], summary["layers_before"], summary["layers_after"], seconds, plan["layers"])


if __name__ == "__main__":
    main()
