"""One checkpoint evaluated as the ``evaluate`` stage does: perplexity, lm-eval benchmarks and efficiency.

:func:`evaluate_checkpoint` returns the three records the stage writes (``pipeline/evaluate.py``):

- ``metrics``: numbers a rerun on the same inputs reproduces to the byte -- the model's size,
  perplexities, each task's aggregates and the evaluation settings;
- ``documents``: per task, each document's 0/1 result, chosen and gold answer and number of choices, and
  the task's floor (chance, majority class), for paired differences and answer drift
  (:func:`layerfold.evaluation.results.split_documents`);
- ``machine``: wall times, the efficiency measurement, the device and library versions (they change with
  every run, so the stage keeps them out of git and ``dvc.lock``; :func:`timings_file` says where).

``hardware=sequential`` scores perplexity and lm-eval layer by layer from the checkpoint's shards
(:mod:`layerfold.evaluation.perplexity_layerwise`, :mod:`layerfold.evaluation.lm_eval_layerwise`, over
:mod:`layerfold.execution`'s layer-major mechanics).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoTokenizer

from layerfold.evaluation import perplexity_layerwise
from layerfold.evaluation.efficiency import measure_efficiency
from layerfold.evaluation.lm_eval_layerwise import LayerwiseModel
from layerfold.models import checkpoint_facts, describe, load_checkpoint
from layerfold.models.devices import device_name, library_versions
from layerfold.models.sources import POINTER_FILE, resolve_pointer

log = logging.getLogger(__name__)

PPL_TEXT = {"wikitext2": "wikitext2_test.txt", "c4": "c4.txt"}


def cache_root(configured: str | None) -> Path | None:
    """``eval.lm_eval.request_cache``; a relative path is taken from ``$DVC_ROOT`` (the main
    workspace, also for queued experiments), so every run of every model shares one cache."""
    if configured is None:
        return None
    path = Path(configured)
    return path if path.is_absolute() else Path(os.environ.get("DVC_ROOT") or Path.cwd()) / path


def timings_file(timings_dir: Path, name: str) -> Path:
    """Where the ``evaluate@<name>`` stage's timings and machine facts go: ``<timings_dir>/[<experiment>/]
    evaluate-<name>.json``, under ``dvc exp run`` in the main workspace (``$DVC_ROOT``), one folder per
    experiment, where ``scripts/runs.py collect`` finds it."""
    experiment = os.environ.get("DVC_EXP_NAME")
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()) if experiment else Path.cwd()
    return root / timings_dir / (experiment or "") / f"evaluate-{name}.json"


def same_model_as(checkpoint: str | Path) -> str | None:
    """The checkpoint a pointer folder stands for (``recovery=none``: the "recovered" model is the compressed
    one, copied or linked with a pointer naming it, and scoring it twice would only cost time), relative so
    outputs stay portable across clones; None for a checkpoint of its own."""
    if (Path(checkpoint) / POINTER_FILE).exists():
        return os.path.relpath(resolve_pointer(checkpoint))
    return None


def evaluate_checkpoint(params: DictConfig, checkpoint: str, name: str, device: torch.device, dtype: torch.dtype,
                        eval_data: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(metrics, documents, machine)`` of ``checkpoint`` under ``params.eval`` (see the module docstring);
    ``eval_data`` is the prepared evaluation data (perplexity texts, ``benchmarks/``)."""
    cfg = params.eval
    # hardware=sequential scores perplexity and lm-eval layer by layer from the checkpoint's shards; the
    # efficiency measurement (decoding) needs the whole model, so it is loaded only when that is enabled.
    layer_major = params.hardware.mode == "sequential"
    if layer_major and not cfg.efficiency.enabled:
        model = LayerwiseModel.from_checkpoint(resolve_pointer(checkpoint), params.hardware, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(resolve_pointer(checkpoint))
        metrics: dict = {"model": {"num_layers": checkpoint_facts(resolve_pointer(checkpoint)).num_layers}}
    else:
        model, tokenizer = load_checkpoint(checkpoint, device, dtype)
        metrics = {"model": describe(model)}
    metrics["dtype"] = str(dtype).replace("torch.", "")
    machine = {"device": device_name(device), "versions": library_versions()}
    timings: dict[str, float] = {}
    documents: dict = {}

    started = time.perf_counter()
    metrics["perplexity"] = {}
    for dataset in cfg.perplexity.datasets:
        if dataset not in PPL_TEXT:
            raise ValueError(f"Unknown perplexity dataset '{dataset}'; choose from {sorted(PPL_TEXT)}.")
        text = (eval_data / PPL_TEXT[dataset]).read_text(encoding="utf-8")
        p = cfg.perplexity
        source = resolve_pointer(checkpoint) if layer_major else model
        metrics["perplexity"][dataset] = perplexity_layerwise.perplexity(source, tokenizer, text, p.seq_len, params.hardware,
                                                                         p.max_windows, p.add_bos, p.batch_size, device, dtype)
        cost = metrics["perplexity"][dataset].pop("execution")
        log.debug("%s perplexity cost: %s", dataset, cost)
        log.info("%s perplexity: %.3f over %d tokens (%s, %.1f s)", dataset, metrics["perplexity"][dataset]["perplexity"],
                 metrics["perplexity"][dataset]["tokens_scored"], cost["mode"], cost["seconds"])
    timings["perplexity_s"] = time.perf_counter() - started

    if cfg.lm_eval.tasks:
        started = time.perf_counter()
        metrics["lm_eval"], documents["lm_eval"], metrics["lm_eval_settings"] = _benchmarks(
            model, tokenizer, cfg.lm_eval, cfg.lm_eval.seed, name, eval_data / "benchmarks")
        timings["lm_eval_s"] = time.perf_counter() - started

    if cfg.efficiency.enabled:
        e = cfg.efficiency
        # one model per stage: two stages' numbers are not a paired comparison (the report says so;
        # benchmarks/layer_removal_speed.py alternates dense and compressed in one process)
        machine["efficiency"] = measure_efficiency(model, batch_size=e.batch_size, prompt_len=e.prompt_len, new_tokens=e.new_tokens,
                                                   warmup=e.warmup, repeats=e.repeats, seed=params.runtime.seed)
    machine["wall_time"] = {k: round(v, 2) for k, v in timings.items()}
    return metrics, documents, machine


def _benchmarks(model: Any, tokenizer: Any, le: DictConfig, seed: int, name: str,
                benchmarks: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """lm-eval on the local task files rendered from ``benchmarks`` (the stock tasks where it is absent):
    (aggregates per task, per-document data per task, the settings that produced them)."""
    from layerfold.evaluation.results import split_documents
    from layerfold.evaluation.runner import quiet_lm_eval, run_lm_eval
    from layerfold.evaluation.task_configs import write_task_configs

    cache = cache_root(le.request_cache)
    quiet_lm_eval(cache / "logs" / f"evaluate-{name}.log" if cache else None)
    with tempfile.TemporaryDirectory() as task_dir:
        local = write_task_configs(benchmarks, Path(task_dir)) if benchmarks.exists() else None
        results = run_lm_eval(
            model, tokenizer, list(le.tasks), dict(le.num_fewshot), le.batch_size, le.limit, local, le.max_length,
            le.bootstrap_iters, seed=seed, cache_dir=cache, scoring=le.scoring, head_rows=le.head_rows,
            batch_tokens=le.batch_tokens,
        )
    aggregates, documents = split_documents(results)
    settings = {
        "limit": le.limit, "sampling": "seeded random subset" if le.limit is not None else "full sets",
        "seed": seed, "num_fewshot": dict(le.num_fewshot), "local_tasks": local is not None,
        "scoring": le.scoring, "head_rows": le.head_rows, "batch_tokens": le.batch_tokens,
    }
    return aggregates, documents, settings


def numbers_to_track(metrics: dict[str, Any], machine: dict[str, Any]) -> dict[str, float]:
    """The numeric leaves of ``metrics``, the efficiency record and the wall times as flat ``a/b/c`` keys:
    what the stage logs to the experiment tracker."""
    return _flatten(metrics) | _flatten({"efficiency": machine.get("efficiency") or {}, "wall_time": machine["wall_time"]})


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat
