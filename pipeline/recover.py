"""Stage `recover`: heal the compressed model with the recovery engine, or pass it through.

    dvc repro recover     # params: recovery  ->  artifacts/recovered/, metrics/recover.json, metrics/recover_curve.csv
                          #                       (times, memory, device: metrics/recover_time.json, not tracked)

    accelerate launch --num_processes 2 -m pipeline.recover      # the same stage on 2 GPUs of one host
    accelerate launch --multi_gpu --num_processes 8 -m pipeline.recover   # with recovery.distributed=fsdp2: models
                                                                          # larger than one GPU (docs/scaling.md)
    torchrun --standalone --nproc_per_node 2 -m pipeline.recover  # the same, launched by torchrun

With ``recovery=none`` the output is a pointer to ``artifacts/compressed`` (no weights copied);
``layerfold.models.load_checkpoint`` follows it. Otherwise the dense base model is the teacher, the
compressed model the student, and ``plan.json`` says which original layers each new layer stands for;
it is checked against the checkpoint it was sealed to (:func:`layerfold.models.fingerprint.check_plan`)
before anything trains, so an edited plan or swapped weights stop here.

``hardware=resident`` loads both models whole. ``hardware=sequential`` (layer-local recovery only,
:mod:`layerfold.recovery.layer_major`) never does: the teacher's span boundaries are computed once,
layer by layer, from the base checkpoint's shards; only the trained layers of the student are
materialised; the recovered checkpoint is written layer by layer from the compressed one. The same
engine loop trains both ways; ``metrics/recover_time.json`` records what the layer-major passes cost
under ``execution``.

Under a launcher every process loads both models onto its own GPU and builds the same training data;
the engine shares the work (``recovery.distributed``). The main process alone writes the outputs, the
resumable checkpoints and the logs, so no two processes race on a temporary folder.
"""

import csv
import logging
import shutil
import time

import torch
import transformers
from transformers import AutoTokenizer, GenerationConfig

from layerfold.data.training import build_training_data
from layerfold.io import atomic_dir, atomic_file, read_json, write_json
from layerfold.models import describe, save_checkpoint
from layerfold.models.devices import device_name, host_peak_rss_mib
from layerfold.models.fingerprint import SEAL_KEY, check_plan
from layerfold.models.sources import PLAN_FILE, resolve_dtype, write_pointer
from layerfold.recovery import RecoveryEngine
from layerfold.recovery.layer_major import check_layer_major, execution_report, layer_major_engine, save_recovered
from layerfold.recovery.distributed import end_processes, is_main_process, launched_processes, load_for_launch, process_device
from layerfold.runtime import peak_memory_mib, reset_peak_memory
from layerfold.stage import BASE, COMPRESSED, METRICS, RECOVERED, RECOVERY_STATE, start
from layerfold.tracking import init_run

CURVE = METRICS / "recover_curve.csv"
RECOVER_TIME = METRICS / "recover_time.json"  # machine facts: git-ignored, a top-level metric of dvc.yaml


def main() -> None:
    stage = start("recover")
    cfg = stage.params.recovery
    processes = launched_processes()
    device = process_device(stage.device)  # this process's GPU under a launcher
    main_process = is_main_process()
    if not main_process:  # one log and one set of progress bars, from the main process
        logging.getLogger().setLevel(logging.WARNING)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    plan = read_json(COMPRESSED / PLAN_FILE)
    check_plan(plan, COMPRESSED)  # the plan compress wrote for these weights, unchanged, or nothing trains
    if cfg.name == "none":
        if main_process:
            _pass_through(plan)
        end_processes()
        return

    hardware = stage.params.hardware
    layer_major = hardware.mode == "sequential"
    RecoveryEngine.check(cfg, processes)  # bad settings fail before models or data are loaded
    if layer_major:
        check_layer_major(cfg, processes)
    run = init_run(stage.params, "recover") if main_process else None
    if layer_major:  # neither model is loaded whole: the engine reads both checkpoints layer by layer
        tokenizer = AutoTokenizer.from_pretrained(BASE)
    else:
        # Under recovery.distributed=fsdp2 only the main process reads the checkpoints; the engine shards both models.
        teacher, tokenizer = load_for_launch(BASE, device, stage.dtype, cfg, processes)
        teacher.requires_grad_(False)
        # The student trains in float32 (master weights); on CUDA the forward runs under bf16 autocast.
        student, _ = load_for_launch(COMPRESSED, device, torch.float32, cfg, processes)
    train, val, data_meta = build_training_data(cfg.data, tokenizer, stage.params.data.local_dir)
    logging.info("training data: %d x %d tokens (%s), validation %d blocks", *train.shape,
                 ", ".join(f"{m['source']} {m['share_actual']:.0%}" for m in data_meta["mix"]), val.shape[0])

    reset_peak_memory(device)
    started = time.perf_counter()
    engine_kwargs = dict(state_dir=RECOVERY_STATE, on_log=run.log if run else None)
    if layer_major:
        engine = layer_major_engine(BASE, COMPRESSED, plan, cfg, train, val, hardware, device, stage.dtype, **engine_kwargs)
    else:
        engine = RecoveryEngine(student, teacher, plan, cfg, train, val, train_device=device, **engine_kwargs)
    model, summary = engine.run()
    wall = time.perf_counter() - started
    # peak accelerator memory of every process (a collective: each process sends its own); the layer-major
    # LM-loss passes reset the peak statistics, so the peak before each reset counts too
    peak = max(peak_memory_mib(device), getattr(engine.lm_loss, "peak_gpu_mib", None) or 0.0) if device.type == "cuda" else None
    peaks = engine.per_process(round(peak, 1) if peak is not None else None)
    host_peaks = engine.per_process(round(host_peak_rss_mib(), 1))
    if main_process:
        storage = resolve_dtype(stage.params.model.storage_dtype)
        # The compressed plan plus what recovery did, sealed to the recovered weights in the same atomic output.
        recovered_plan = {**{k: v for k, v in plan.items() if k != SEAL_KEY}, "compressed_checkpoint": plan[SEAL_KEY],
                          "recovery": {"name": cfg.name, "layers_trained": summary["layers_trained"], "data": data_meta}}
        if layer_major:
            generation = GenerationConfig.from_pretrained(COMPRESSED) if (COMPRESSED / "generation_config.json").exists() else None
            save_recovered(model, summary["layers_trained"], COMPRESSED, tokenizer, RECOVERED, storage, generation_config=generation,
                           plan=recovered_plan)
        else:
            save_checkpoint(model, tokenizer, RECOVERED, dtype=storage, plan=recovered_plan)
        run_cost = engine.summary_metrics(summary, device_name(device))
        # What the run made (deterministic for a given device) goes to recover.json, a DVC output; what it cost
        # on this machine (times, memory, device) to recover_time.json, which git ignores and DVC does not hash.
        metrics = {
            "recovery": cfg.name,
            "trained": True,
            "train_tokens_processed": run_cost["train_tokens_processed"],
            **summary,
            "phases": [{k: v for k, v in phase.items() if k != "seconds"} for phase in summary["phases"]],
            "data": data_meta,
            "validation": engine.validation,
            **{k: v for k, v in describe(model).items() if k.startswith("params_") and k != "params_per_layer"},
        }
        timing = {
            "recovery": cfg.name,
            **{k: v for k, v in run_cost.items() if k != "train_tokens_processed"},
            "wall_seconds": round(wall, 3),
            "peak_gpu_memory_mib": max(peaks) if device.type == "cuda" else None,  # the largest of the processes'
            "peak_host_rss_mib": round(host_peak_rss_mib(), 1),
            "device": device_name(device),
            "phase_seconds": {phase["name"]: phase["seconds"] for phase in summary["phases"]},
            "execution": execution_report(engine),
        }
        if processes > 1:
            timing.update(peak_gpu_memory_mib_per_process=peaks, peak_host_rss_mib_per_process=host_peaks)
        write_json(METRICS / "recover.json", metrics)
        write_json(RECOVER_TIME, timing)
        _write_curve(engine.curve)
        shutil.rmtree(RECOVERY_STATE, ignore_errors=True)
        run.log({f"recover/{k}": v for k, v in {**metrics, **timing}.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.finish()
        logging.info("recovered: val LM loss %.4f -> %.4f, %s tokens/s", summary["val_lm_loss_before"] or float("nan"),
                     summary["val_lm_loss_after"] or float("nan"), timing["tokens_per_s"])
    end_processes()


def _pass_through(plan: dict) -> None:
    """recovery=none: a pointer to the compressed checkpoint, no weights copied."""
    if plan.get("details", {}).get("needs_training"):
        logging.warning("%s left an untrained replacement layer; recovery=none keeps it as initialised "
                        "(use recovery=distill or recovery=lm to train it)", plan["method"]["name"])
    with atomic_dir(RECOVERED) as tmp:
        write_pointer(tmp, COMPRESSED)
        shutil.copy(COMPRESSED / PLAN_FILE, tmp / PLAN_FILE)  # sealed to the checkpoint the pointer names
    write_json(METRICS / "recover.json", {"recovery": "none", "trained": False})
    write_json(RECOVER_TIME, {"recovery": "none"})  # replaces a trained run's times
    _write_curve([])
    logging.info("recovery=none: %s points at %s", RECOVERED, COMPRESSED)


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
