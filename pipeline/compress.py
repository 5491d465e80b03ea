"""Stage `compress`: run the configured method on the dense model and save the result.

    dvc repro compress    # params: method  ->  artifacts/compressed/ (checkpoint + plan.json), metrics/compress.json

Wall time, peak memory and the device go to metrics/compress_time.json, which no stage depends on: a
re-run that writes the same model and plan leaves the report and everything else up to date.
"""

import logging
import time

import torch
from safetensors.torch import load_file

from layerfold.capture import BoundaryStatistics
from layerfold.evaluation.efficiency import device_name, peak_memory_mib, reset_peak_memory
from layerfold.io import write_json
from layerfold.methods import MethodContext, compress
from layerfold.models import describe, load_checkpoint, save_checkpoint
from layerfold.models.resources import guard
from layerfold.models.sources import resolve_dtype
from layerfold.stage import BASE, CALIBRATION, COMPRESSED, CAPTURE, METRICS, start
from layerfold.tracking import init_run


def main() -> None:
    stage = start("compress")
    run = init_run(stage.params, "compress")
    blocks = load_file(CALIBRATION / "blocks.safetensors")["input_ids"]
    # Iterative methods re-capture statistics of the current model, so the capture estimate applies.
    guard(BASE, stage.device, stage.dtype, stage.params.capture.batch_size, blocks.shape[1], "capture.batch_size", all_boundaries=True)
    model, tokenizer = load_checkpoint(BASE, stage.device, stage.dtype)
    stats = BoundaryStatistics.from_tensors(load_file(CAPTURE / "stats.safetensors"))
    ctx = MethodContext(model, tokenizer, blocks, stats, batch_size=stage.params.capture.batch_size)

    reset_peak_memory(stage.device)
    start_time = time.perf_counter()
    plan = compress(ctx, stage.params.method)
    if stage.device.type == "cuda":
        torch.cuda.synchronize(stage.device)
    seconds = time.perf_counter() - start_time

    storage = resolve_dtype(stage.params.model.storage_dtype)
    save_checkpoint(model, tokenizer, COMPRESSED, dtype=storage)
    write_json(COMPRESSED / "plan.json", plan)
    summary = {
        "method": plan["method"]["name"],
        "layers_before": plan["original_layers"],
        "layers_after": len(plan["layers"]),
        "removed": plan["removed"],
        "merged": plan["merged"],
        **{k: v for k, v in describe(model).items() if k.startswith("params_") and k != "params_per_layer"},
    }
    timing = {"seconds": round(seconds, 3), "peak_memory_mib": round(peak_memory_mib(stage.device), 1), "device": device_name(stage.device)}
    write_json(METRICS / "compress.json", summary)
    write_json(METRICS / "compress_time.json", timing)
    run.log({f"compress/{k}": v for k, v in {**summary, **timing}.items() if isinstance(v, (int, float))})
    run.finish()
    logging.info("%s: %d -> %d layers in %.1fs; plan: %s", summary["method"], summary["layers_before"], summary["layers_after"], seconds, plan["layers"])


if __name__ == "__main__":
    main()
