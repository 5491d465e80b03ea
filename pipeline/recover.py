"""Stage `recover`: heal the compressed model with the recovery engine, or pass it through.

    dvc repro recover     # params: recovery  ->  artifacts/recovered/, metrics/recover.json, metrics/recover_curve.csv

With ``recovery=none`` the output is a pointer to ``artifacts/compressed`` (no weights copied);
``layerfold.models.load_checkpoint`` follows it. Otherwise the dense base model is the teacher, the
compressed model the student, and ``plan.json`` says which original layers each new layer stands for.
"""

import csv
import logging
import shutil
import time

import torch

from layerfold.data.training import build_training_data
from layerfold.evaluation.efficiency import device_name, peak_memory_mib, reset_peak_memory
from layerfold.io import atomic_dir, atomic_file, read_json, write_json
from layerfold.models import describe, load_checkpoint, save_checkpoint
from layerfold.models.sources import resolve_dtype, write_pointer
from layerfold.recovery import RecoveryEngine
from layerfold.recovery.engine import host_peak_rss_mib
from layerfold.stage import BASE, COMPRESSED, METRICS, RECOVERED, RECOVERY_STATE, start
from layerfold.tracking import init_run

CURVE = METRICS / "recover_curve.csv"


def main() -> None:
    stage = start("recover")
    cfg = stage.params.recovery
    plan = read_json(COMPRESSED / "plan.json")
    if cfg.name == "none":
        if plan.get("details", {}).get("needs_training"):
            logging.warning("%s left an untrained replacement layer; recovery=none keeps it as initialised "
                            "(use recovery=distill or recovery=lm to train it)", plan["method"]["name"])
        with atomic_dir(RECOVERED) as tmp:
            write_pointer(tmp, COMPRESSED)
            shutil.copy(COMPRESSED / "plan.json", tmp / "plan.json")
        write_json(METRICS / "recover.json", {"recovery": "none", "trained": False})
        _write_curve([])
        logging.info("recovery=none: %s points at %s", RECOVERED, COMPRESSED)
        return

    RecoveryEngine.check(cfg)  # bad settings fail before models or data are loaded
    run = init_run(stage.params, "recover")
    teacher, tokenizer = load_checkpoint(BASE, stage.device, stage.dtype)
    teacher.requires_grad_(False)
    # The student trains in float32 (master weights); on CUDA the forward runs under bf16 autocast.
    student, _ = load_checkpoint(COMPRESSED, stage.device, torch.float32)
    train, val, data_meta = build_training_data(cfg.data, tokenizer, stage.params.data.local_dir)
    logging.info("training data: %d x %d tokens (%s), validation %d blocks", *train.shape,
                 ", ".join(f"{m['source']} {m['share_actual']:.0%}" for m in data_meta["mix"]), val.shape[0])

    reset_peak_memory(stage.device)
    started = time.perf_counter()
    engine = RecoveryEngine(student, teacher, plan, cfg, train, val, state_dir=RECOVERY_STATE, on_log=run.log)
    model, summary = engine.run()
    wall = time.perf_counter() - started
    device = device_name(stage.device)

    save_checkpoint(model, tokenizer, RECOVERED, dtype=resolve_dtype(stage.params.model.storage_dtype))
    write_json(RECOVERED / "plan.json", {**plan, "recovery": {"name": cfg.name, "layers_trained": summary["layers_trained"], "data": data_meta}})
    metrics = {
        "recovery": cfg.name,
        "trained": True,
        **engine.summary_metrics(summary, device),
        "wall_seconds": round(wall, 3),
        "peak_gpu_memory_mib": round(peak_memory_mib(stage.device), 1) if stage.device.type == "cuda" else None,
        "peak_host_rss_mib": round(host_peak_rss_mib(), 1),
        "device": device,
        **summary,
        "data": data_meta,
        "validation": engine.validation,
        **{k: v for k, v in describe(model).items() if k.startswith("params_") and k != "params_per_layer"},
    }
    write_json(METRICS / "recover.json", metrics)
    _write_curve(engine.curve)
    shutil.rmtree(RECOVERY_STATE, ignore_errors=True)
    run.log({f"recover/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run.finish()
    logging.info("recovered: val LM loss %.4f -> %.4f, %s tokens/s", summary["val_lm_loss_before"] or float("nan"),
                 summary["val_lm_loss_after"], metrics["tokens_per_s"])


def _write_curve(points: list[dict]) -> None:
    """Loss curve for `dvc plots` (one row per logged optimiser step; step counts across phases)."""
    with atomic_file(CURVE) as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "phase", "loss", "lr", "tokens"])
        writer.writeheader()
        offset, last_phase, last_step = 0, None, 0
        for point in points:
            if point["phase"] != last_phase:
                offset, last_phase = offset + last_step, point["phase"]
            last_step = point["step"]
            writer.writerow({**point, "step": offset + point["step"]})


if __name__ == "__main__":
    main()
