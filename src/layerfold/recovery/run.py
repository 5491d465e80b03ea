"""The recover stage's work: heal the compressed checkpoint with the recovery engine, or pass it through.

With ``recovery=none`` the output is a pointer to the compressed checkpoint (no weights copied);
``layerfold.models.load_checkpoint`` follows it. Otherwise the dense base model is the teacher, the
compressed model the student, and ``plan.json`` says which original layers each new layer stands for;
it is checked against the checkpoint it was sealed to (:func:`layerfold.models.fingerprint.check_plan`)
before anything trains, so an edited plan or swapped weights stop here.

``hardware=resident`` loads both models whole. ``hardware=sequential`` (layer-local recovery only,
:mod:`layerfold.recovery.layer_major`) never does: the teacher's span boundaries are computed once,
layer by layer, from the base checkpoint's shards; only the trained layers of the student are
materialised; the recovered checkpoint is written layer by layer from the compressed one. The same
engine loop trains both ways; ``recover_time.json`` records what the layer-major passes cost under
``execution``.

Under a launcher every process loads both models onto its own GPU and builds the same training data;
the engine shares the work (``recovery.distributed``). The main process alone writes the outputs, the
resumable checkpoints and the logs, so no two processes race on a temporary folder.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig
from transformers import AutoTokenizer, GenerationConfig

from layerfold.data.training import build_training_data
from layerfold.runtime import peak_memory_mib, reset_peak_memory
from layerfold.io import atomic_dir, atomic_file, link_or_copy, read_json, write_json
from layerfold.models import describe, save_checkpoint
from layerfold.models.card import CARD_FILE, write_model_card
from layerfold.models.devices import device_name, host_peak_rss_mib
from layerfold.models.fingerprint import SEAL_KEY, check_plan
from layerfold.models.sources import PLAN_FILE, resolve_dtype, write_pointer
from layerfold.recovery.distributed import end_processes, is_main_process, launched_processes, load_for_launch, process_device
from layerfold.recovery.engine import RecoveryEngine
from layerfold.recovery.layer_major import check_layer_major, execution_report, layer_major_engine, save_recovered
from layerfold.tracking import init_run


@dataclass(frozen=True)
class RecoverPaths:
    """Where the recover stage reads and writes."""

    base: Path  # the dense model (teacher)
    compressed: Path  # the student, with its sealed plan.json
    recovered: Path  # the output checkpoint (or pointer)
    state: Path  # resumable training checkpoints, removed on success
    metrics: Path  # recover.json, recover_curve.csv, recover_time.json

    @property
    def curve(self) -> Path:
        return self.metrics / "recover_curve.csv"

    @property
    def timing(self) -> Path:
        return self.metrics / "recover_time.json"  # machine facts: git-ignored, a top-level metric of dvc.yaml


def recover_stage(params: DictConfig, stage_device: torch.device, dtype: torch.dtype, paths: RecoverPaths) -> None:
    """Run the recover stage with checked ``params`` on ``stage_device`` (each launched process: its own GPU)."""
    cfg = params.recovery
    processes = launched_processes()
    device = process_device(stage_device)  # this process's GPU under a launcher
    main_process = is_main_process()
    if not main_process:  # one log and one set of progress bars, from the main process
        logging.getLogger().setLevel(logging.WARNING)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    plan = read_json(paths.compressed / PLAN_FILE)
    check_plan(plan, paths.compressed)  # the plan compress wrote for these weights, unchanged, or nothing trains
    if cfg.name == "none":
        if main_process:
            pass_through(plan, paths, params)
        end_processes()
        return

    hardware = params.hardware
    layer_major = hardware.mode == "sequential"
    RecoveryEngine.check(cfg, processes)  # bad settings fail before models or data are loaded
    if layer_major:
        check_layer_major(cfg, processes)
    run = init_run(params, "recover") if main_process else None
    if layer_major:  # neither model is loaded whole: the engine reads both checkpoints layer by layer
        tokenizer = AutoTokenizer.from_pretrained(paths.base)
    else:
        # Under recovery.distributed=fsdp2 only the main process reads the checkpoints; the engine shards both models.
        teacher, tokenizer = load_for_launch(paths.base, device, dtype, cfg, processes)
        teacher.requires_grad_(False)
        # The student trains in float32 (master weights); on CUDA the forward runs under bf16 autocast.
        student, _ = load_for_launch(paths.compressed, device, torch.float32, cfg, processes)
    train, val, data_meta = build_training_data(cfg.data, tokenizer, params.data.local_dir)
    logging.info("training data: %d x %d tokens (%s), validation %d blocks", *train.shape,
                 ", ".join(f"{m['source']} {m['share_actual']:.0%}" for m in data_meta["mix"]), val.shape[0])

    reset_peak_memory(device)
    started = time.perf_counter()
    engine_kwargs = dict(state_dir=paths.state, on_log=run.log if run else None)
    if layer_major:
        engine = layer_major_engine(paths.base, paths.compressed, plan, cfg, train, val, hardware, device, dtype, **engine_kwargs)
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
        storage = resolve_dtype(params.model.storage_dtype)
        # The compressed plan plus what recovery did, sealed to the recovered weights in the same atomic output.
        recovered_plan = {**{k: v for k, v in plan.items() if k != SEAL_KEY}, "compressed_checkpoint": plan[SEAL_KEY],
                          "recovery": {"name": cfg.name, "layers_trained": summary["layers_trained"], "data": data_meta}}
        if layer_major:
            generation = (GenerationConfig.from_pretrained(paths.compressed)
                          if (paths.compressed / "generation_config.json").exists() else None)
            save_recovered(model, summary["layers_trained"], paths.compressed, tokenizer, paths.recovered, storage,
                           generation_config=generation, plan=recovered_plan)
        else:
            save_checkpoint(model, tokenizer, paths.recovered, dtype=storage, plan=recovered_plan)
        write_card(paths.recovered, params, plan, [
            f"validation LM loss {summary['val_lm_loss_before']:.4f} before recovery, {summary['val_lm_loss_after']:.4f} after "
            "(`metrics/recover.json`; loss curve `metrics/recover_curve.csv`)"
            if summary.get("val_lm_loss_before") is not None and summary.get("val_lm_loss_after") is not None
            else "training: `metrics/recover.json`, loss curve `metrics/recover_curve.csv`",
        ], paths)
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
        write_json(paths.metrics / "recover.json", metrics)
        write_json(paths.timing, timing)
        write_curve(engine.curve, paths.curve)
        shutil.rmtree(paths.state, ignore_errors=True)
        run.log({f"recover/{k}": v for k, v in {**metrics, **timing}.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.finish()
        logging.info("recovered: val LM loss %.4f -> %.4f, %s tokens/s", summary["val_lm_loss_before"] or float("nan"),
                     summary["val_lm_loss_after"] or float("nan"), timing["tokens_per_s"])
    end_processes()


def write_card(folder: Path, params: DictConfig, plan: dict, metrics: list[str], paths: RecoverPaths) -> None:
    """The recovered checkpoint's model card (written before evaluation: it says where the accuracies go)."""
    from layerfold.surgery.plan import describe_plan

    model = params.model
    recovery = {k: v for k, v in dict(params.recovery).items() if not isinstance(v, dict) and not hasattr(v, "keys")}
    method = plan.get("method") or {"name": "a hand-written plan"}  # compress always records it; a plan written by hand may not
    write_model_card(
        folder, title=f"{model.name}, {len(plan['layers'])} of {plan['original_layers']} layers, {method['name']} + recovery={params.recovery.name}",
        path_hint=str(paths.recovered), method=method, plan_line=describe_plan(plan), recovery=recovery,
        base_model_id=model.id if model.source == "hub" else None,
        metrics=[*metrics, "accuracies and perplexity, once evaluated: `metrics/recovered.json`; the run's headline ± se and "
                 "Δ vs dense: `metrics/summary.json` and `reports/report.md`"],
    )


def pass_through(plan: dict, paths: RecoverPaths, params: DictConfig) -> None:
    """recovery=none: the compressed checkpoint as the recovered one (hard links or copies), with a pointer naming it."""
    if plan.get("details", {}).get("needs_training"):
        logging.warning("%s left an untrained replacement layer; recovery=none keeps it as initialised "
                        "(use recovery=distill or recovery=lm to train it)", plan["method"]["name"])
    with atomic_dir(paths.recovered) as tmp:
        # every file of the checkpoint (the plan too: sealed to these same weights), its card written anew below
        for file in sorted(paths.compressed.iterdir()):
            if file.is_file() and file.name != CARD_FILE:
                link_or_copy(file, tmp / file.name)
        write_pointer(tmp, paths.compressed)
        write_card(tmp, params, plan, ["not trained (recovery=none): the same weights as `artifacts/compressed`"], paths)
    write_json(paths.metrics / "recover.json", {"recovery": "none", "trained": False})
    write_json(paths.timing, {"recovery": "none"})  # replaces a trained run's times
    write_curve([], paths.curve)
    logging.info("recovery=none: %s is a copy of %s", paths.recovered, paths.compressed)


def write_curve(points: list[dict], path: Path) -> None:
    """Loss curve for `dvc plots` (one row per logged optimiser step; step counts across phases)."""
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "phase", "loss", "lr", "tokens"])
        writer.writeheader()
        offset, last_phase, last_step = 0, None, 0
        for point in points:
            if point["phase"] != last_phase:
                offset, last_phase = offset + last_step, point["phase"]
            last_step = point["step"]
            writer.writerow({**point, "step": offset + point["step"]})
