"""Stage `compress`: run the configured method on the dense model and save the result.

    dvc repro compress    # params: method  ->  artifacts/compressed/ (checkpoint + plan.json), metrics/compress.json
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
from layerfold.models.sources import resolve_dtype
from layerfold.stage import BASE, CALIBRATION, COMPRESSED, CAPTURE, METRICS, start
from layerfold.tracking import init_run


def main() -> None:
    stage = start("compress")
    run = init_run(stage.params, "compress")
    model, tokenizer = load_checkpoint(BASE, stage.device, stage.dtype)
    blocks = load_file(CALIBRATION / "blocks.safetensors")["input_ids"]
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
        "seconds": round(seconds, 3),
        "peak_memory_mib": round(peak_memory_mib(stage.device), 1),
        "device": device_name(stage.device),
        **{k: v for k, v in describe(model).items() if k.startswith("params_") and k != "params_per_layer"},
    }
    write_json(METRICS / "compress.json", summary)
    run.log({f"compress/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    run.finish()
    logging.info("%s: %d -> %d layers in %.1fs; plan: %s", summary["method"], summary["layers_before"], summary["layers_after"], seconds, plan["layers"])


if __name__ == "__main__":
    main()
