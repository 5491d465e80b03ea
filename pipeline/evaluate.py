"""Stage `evaluate@<name>`: perplexity, lm-eval benchmarks and efficiency of one checkpoint.

    dvc repro evaluate@dense evaluate@compressed   # params: eval

Outputs:

- ``metrics/<name>.json`` (DVC metrics): numbers a rerun on the same inputs reproduces to the byte --
  the model's size, perplexities, each task's aggregates and the evaluation settings;
- ``metrics/documents/<name>.json`` (a plain output): per task, each document's 0/1 result, chosen and
  gold answer and number of choices, and the task's floor (chance, majority class), for paired
  differences and answer drift (:func:`layerfold.evaluation.harness.split_documents`);
- ``metrics/timings/[<experiment>/]evaluate-<name>.json`` (git-ignored, not a DVC output, so its
  changing bytes touch neither git nor ``dvc.lock``): wall times, the efficiency measurement, the device
  and library versions. Under ``dvc exp run`` it goes to the main workspace (``$DVC_ROOT``), one folder
  per experiment, where ``scripts/runs.py collect`` finds it.

Usage: python -m pipeline.evaluate <name> <checkpoint dir>
"""

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from layerfold.evaluation import perplexity_layerwise
from layerfold.evaluation.efficiency import device_name, measure_efficiency
from layerfold.evaluation.lm_eval_layerwise import LayerwiseModel
from layerfold.models.devices import library_versions
from layerfold.io import write_json
from layerfold.models import checkpoint_facts, describe, load_checkpoint
from layerfold.models.sources import POINTER_FILE, resolve_pointer
from layerfold.stage import EVAL_DATA, METRICS, start

DOCUMENTS = METRICS / "documents"  # per-document results: a plain output, not a metrics file
TIMINGS = METRICS / "timings"  # wall times, efficiency, device, versions: git-ignored, not a DVC output
from layerfold.tracking import init_run

PPL_TEXT = {"wikitext2": "wikitext2_test.txt", "c4": "c4.txt"}


def cache_root(configured: str | None) -> Path | None:
    """``eval.lm_eval.request_cache``; a relative path is taken from ``$DVC_ROOT`` (the main
    workspace, also for queued experiments), so every run of every model shares one cache."""
    if configured is None:
        return None
    path = Path(configured)
    return path if path.is_absolute() else Path(os.environ.get("DVC_ROOT") or Path.cwd()) / path


def timings_file(name: str) -> Path:
    """Where this stage's timings and machine facts go (git-ignored, see the module docstring)."""
    experiment = os.environ.get("DVC_EXP_NAME")
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()) if experiment else Path.cwd()
    return root / TIMINGS / (experiment or "") / f"evaluate-{name}.json"


def main(name: str, checkpoint: str) -> None:
    stage = start(f"evaluate@{name}")
    cfg = stage.params.eval
    if (Path(checkpoint) / POINTER_FILE).exists():
        # recovery=none: the "recovered" model is a copy of the compressed one; scoring it twice would only cost time
        target = os.path.relpath(resolve_pointer(checkpoint))  # relative: outputs stay portable across clones
        write_json(METRICS / f"{name}.json", {"same_model_as": target})
        write_json(DOCUMENTS / f"{name}.json", {"same_model_as": target})
        logging.info("%s points at %s, which evaluate scores under its own name; nothing to do", checkpoint, target)
        return
    run = init_run(stage.params, f"evaluate-{name}")
    # hardware=sequential scores perplexity and lm-eval layer by layer from the checkpoint's shards; the
    # efficiency measurement (decoding) needs the whole model, so it is loaded only when that is enabled.
    layer_major = stage.params.hardware.mode == "sequential"
    if layer_major and not cfg.efficiency.enabled:
        model = LayerwiseModel.from_checkpoint(resolve_pointer(checkpoint), stage.params.hardware, stage.device, stage.dtype)
        tokenizer = AutoTokenizer.from_pretrained(resolve_pointer(checkpoint))
        metrics: dict = {"model": {"num_layers": checkpoint_facts(resolve_pointer(checkpoint)).num_layers}}
    else:
        model, tokenizer = load_checkpoint(checkpoint, stage.device, stage.dtype)
        metrics = {"model": describe(model)}
    metrics["dtype"] = str(stage.dtype).replace("torch.", "")
    machine = {"device": device_name(stage.device), "versions": library_versions()}
    timings: dict[str, float] = {}
    documents: dict = {}

    started = time.perf_counter()
    metrics["perplexity"] = {}
    for dataset in cfg.perplexity.datasets:
        if dataset not in PPL_TEXT:
            raise ValueError(f"Unknown perplexity dataset '{dataset}'; choose from {sorted(PPL_TEXT)}.")
        text = (EVAL_DATA / PPL_TEXT[dataset]).read_text(encoding="utf-8")
        p = cfg.perplexity
        source = resolve_pointer(checkpoint) if layer_major else model
        metrics["perplexity"][dataset] = perplexity_layerwise.perplexity(source, tokenizer, text, p.seq_len, stage.params.hardware,
                                                                         p.max_windows, p.add_bos, p.batch_size, stage.device, stage.dtype)
        cost = metrics["perplexity"][dataset].pop("execution")
        logging.debug("%s perplexity cost: %s", dataset, cost)
        logging.info("%s perplexity: %.3f over %d tokens (%s, %.1f s)", dataset, metrics["perplexity"][dataset]["perplexity"],
                     metrics["perplexity"][dataset]["tokens_scored"], cost["mode"], cost["seconds"])
    timings["perplexity_s"] = time.perf_counter() - started

    if cfg.lm_eval.tasks:
        from layerfold.evaluation.harness import quiet_lm_eval, run_lm_eval, split_documents, write_task_configs

        started = time.perf_counter()
        le, seed = cfg.lm_eval, stage.params.runtime.seed
        cache = cache_root(le.request_cache)
        quiet_lm_eval(cache / "logs" / f"evaluate-{name}.log" if cache else None)
        benchmarks = EVAL_DATA / "benchmarks"
        with tempfile.TemporaryDirectory() as task_dir:
            local = write_task_configs(benchmarks, Path(task_dir)) if benchmarks.exists() else None
            results = run_lm_eval(
                model, tokenizer, list(le.tasks), dict(le.num_fewshot), le.batch_size, le.limit, local, le.max_length,
                le.bootstrap_iters, seed=seed, cache_dir=cache, scoring=le.scoring, head_rows=le.head_rows,
                batch_tokens=le.batch_tokens,
            )
        metrics["lm_eval"], documents["lm_eval"] = split_documents(results)
        metrics["lm_eval_settings"] = {
            "limit": le.limit, "sampling": "seeded random subset" if le.limit is not None else "full sets",
            "seed": seed, "num_fewshot": dict(le.num_fewshot), "local_tasks": local is not None,
            "scoring": le.scoring, "head_rows": le.head_rows, "batch_tokens": le.batch_tokens,
        }
        timings["lm_eval_s"] = time.perf_counter() - started

    if cfg.efficiency.enabled:
        e = cfg.efficiency
        # one model per stage: two stages' numbers are not a paired comparison (the report says so;
        # benchmarks/layer_removal_speed.py alternates dense and compressed in one process)
        machine["efficiency"] = measure_efficiency(model, batch_size=e.batch_size, prompt_len=e.prompt_len, new_tokens=e.new_tokens,
                                                   warmup=e.warmup, repeats=e.repeats, seed=stage.params.runtime.seed)
    machine["wall_time"] = {k: round(v, 2) for k, v in timings.items()}
    write_json(METRICS / f"{name}.json", metrics)
    write_json(DOCUMENTS / f"{name}.json", documents)
    write_json(timings_file(name), machine)
    run.log(_flatten(metrics) | _flatten({"efficiency": machine.get("efficiency") or {}, "wall_time": machine["wall_time"]}))
    run.finish()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m pipeline.evaluate <name> <checkpoint dir>")
    main(sys.argv[1], sys.argv[2])
