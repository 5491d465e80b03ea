"""lm-eval benchmarks, offline, with the stock tasks' prompts, choices and metrics.

Offline runs cannot reach the hub datasets the stock lm-eval tasks name. Instead:

1. :func:`layerfold.data.benchmarks.prepare_benchmarks` converts the local raw files into JSONL in
   each stock task's row schema.
2. :func:`write_task_configs` renders one lm-eval task YAML per benchmark (``<task>_local``; MMLU as
   the group ``mmlu_local`` with 4 category groups and 57 ``mmlu_local_<subject>`` tasks) into a run
   directory. Each is the *stock* YAML, loaded through lm-eval's own loader (``include:`` resolved),
   with only the task/group/tag names, ``dataset_path``/``dataset_name``/``dataset_kwargs`` and the
   split names that have no local file changed. ``doc_to_*``, ``process_docs``, ``description``,
   ``fewshot_config`` and ``metric_list`` are copied verbatim; Python hooks are referenced as
   ``!function lm_eval.tasks.<dir>.<module>.<fn>``, i.e. imported from the installed lm-eval rather
   than copied. The specs that drive this are the ``tasks/*_local.yaml`` files next to this module.
3. :func:`run_lm_eval` evaluates a model on those tasks and reports results under the stock names.

Without a local task directory the stock tasks (and the hub) are used unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import math
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from layerfold.evaluation.lm import load_token_cache, make_lm, save_token_cache, token_cache_file, tokenizer_key
from layerfold.io import atomic_dir, read_json

if TYPE_CHECKING:  # lm-eval is heavy to import; only the functions that need it import it.
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SPEC_DIR = Path(__file__).resolve().parent / "tasks"
SPEC_KEY = "layerfold_local_task"
PREPARED_MANIFEST = "manifest.json"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


# ----------------------------------------------------------------------------- specs and renaming


def stock_tasks_dir() -> Path:
    """The ``lm_eval/tasks`` directory of the installed lm-eval."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def load_specs(spec_dir: Path = SPEC_DIR) -> dict[str, dict[str, Any]]:
    """The local-task specs, keyed by stock task name (``{"stock", "prepared", "rename"}`` each)."""
    specs: dict[str, dict[str, Any]] = {}
    for path in sorted(spec_dir.glob("*.yaml")):
        with open(path, encoding="utf-8") as handle:
            spec = yaml.safe_load(handle)[SPEC_KEY]
        stock_name, _ = spec["rename"]
        specs[stock_name] = spec
    return specs


def _rename(name: str, old: str, new: str) -> str | None:
    """``old`` -> ``new`` and ``old_x`` -> ``new_x``; None when ``name`` is not in ``old``'s family."""
    if name == old:
        return new
    if name.startswith(old + "_"):
        return new + name[len(old):]
    return None


def _local_name(stock_name: str, specs: dict[str, dict[str, Any]]) -> str | None:
    for spec in specs.values():
        if (renamed := _rename(stock_name, *spec["rename"])) is not None:
            return renamed
    return None


# ----------------------------------------------------------------------------- YAML rendering


class _TaskDumper(yaml.SafeDumper):
    """SafeDumper that writes callables back as lm-eval's ``!function module.name`` tag."""


def _represent_callable(dumper: yaml.SafeDumper, fn: Any) -> yaml.Node:
    module, qualname = fn.__module__, fn.__qualname__
    # lm-eval resolves `!function a.b.c` by importing module `a.b` and taking attribute `c`; make sure
    # that round-trips now rather than failing later inside an evaluation run.
    if getattr(importlib.import_module(module), qualname, None) is None:
        raise ValueError(f"Cannot reference {module}.{qualname} from a task YAML: not importable.")
    return dumper.represent_scalar("!function", f"{module}.{qualname}")


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    # Prompts with newlines read best as one double-quoted line with \n escapes (as the stock YAMLs write them).
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"' if "\n" in text else None)


_TaskDumper.add_representer(str, _represent_str)
_TaskDumper.add_multi_representer(type(len), _represent_callable)  # builtins
_TaskDumper.add_multi_representer(type(_rename), _represent_callable)  # plain functions


def _dump_yaml(cfg: dict[str, Any], path: Path, header: str) -> None:
    text = yaml.dump(cfg, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True, width=1 << 16)
    path.write_text(header + text, encoding="utf-8")


def _rename_config(cfg: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """Rename the task/group, its tags and group members from the ``old`` family to ``new``.

    Tags outside the family (``ai2_arc``, ``multiple_choice``, ...) are dropped: in a task index that
    also holds the stock tasks they would mix stock and local tasks under one name.
    """
    cfg = dict(cfg)
    for key in ("task", "group"):
        value = cfg.get(key)
        if isinstance(value, str):
            cfg[key] = _rename(value, old, new) or value
        elif isinstance(value, list):  # a group's members
            members = []
            for member in value:
                if not isinstance(member, str):
                    raise ValueError(f"Inline group members are not supported when renaming: {member!r}")
                renamed = _rename(member, old, new)
                if renamed is None:
                    raise ValueError(f"Group member {member!r} is not in the {old!r} family; cannot localise it.")
                members.append(renamed)
            cfg[key] = members
    if "tag" in cfg:
        tags = cfg["tag"] if isinstance(cfg["tag"], list) else [cfg["tag"]]
        kept = [r for t in tags if (r := _rename(t, old, new)) is not None]
        if kept:
            cfg["tag"] = kept if isinstance(cfg["tag"], list) else kept[0]
        else:
            del cfg["tag"]
    return cfg


def _localise_dataset(cfg: dict[str, Any], data_files: dict[str, str], prepared_dir: Path, eval_split: str) -> dict[str, Any]:
    """Point a task config at local JSONL and clear splits that have no local file."""
    cfg = dict(cfg)
    cfg["dataset_path"] = "json"
    cfg["dataset_name"] = None
    cfg["dataset_kwargs"] = {"data_files": {split: str(prepared_dir / rel) for split, rel in data_files.items()}}
    for key in SPLIT_KEYS:
        split = cfg.get(key)
        if split is not None and split not in data_files:
            if split == eval_split:
                raise ValueError(f"Task {cfg['task']}: evaluation split {split!r} has no local file ({data_files}).")
            # e.g. stock piqa's train split: not available offline. Zero-shot runs never read it; few-shot
            # runs are refused by run_lm_eval rather than silently sampling shots from the eval split.
            cfg[key] = None
    return cfg


def _task_files(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, str]:
    """Split -> prepared file for one task; MMLU-style families keep one set per ``dataset_name``."""
    files = meta["data_files"]
    if not any(isinstance(value, dict) for value in files.values()):
        return files
    subset = cfg.get("dataset_name")
    if subset not in files:
        raise KeyError(f"Task {cfg['task']}: no prepared files for dataset_name {subset!r}.")
    return files[subset]


def _stock_configs(stock: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Stock task/group configs under ``stock`` (a YAML file or a directory of them), functions resolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    paths = [stock] if stock.is_file() else sorted(stock.glob("*.yaml"))
    if not paths:
        raise FileNotFoundError(f"No stock lm-eval task config at {stock}; is lm-eval installed at the expected version?")
    # load_yaml resolves `include:` (e.g. arc_challenge -> arc_easy.yaml, mmlu -> _default_template_yaml)
    # and turns `!function` tags into the stock Python callables.
    return [(path, load_yaml(path, resolve_func=True)) for path in paths]


def write_task_configs(prepared_dir: Path, task_dir: Path) -> Path:
    """Render local lm-eval task YAMLs for every benchmark prepared in ``prepared_dir``.

    Args:
        prepared_dir: the ``out_dir`` of :func:`~layerfold.data.benchmarks.prepare_benchmarks`.
        task_dir: where to write; each benchmark gets a subdirectory (``piqa_local/``, ``mmlu_local/``)
            that is replaced as a whole, so no stale config survives a re-render.

    Returns:
        ``task_dir``, ready for ``TaskManager(include_path=task_dir)`` / :func:`lm_eval_tasks`.
    """
    prepared_dir, task_dir = Path(prepared_dir).resolve(), Path(task_dir)
    manifest_path = prepared_dir / PREPARED_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing; run layerfold.data.benchmarks.prepare_benchmarks first.")
    manifest = read_json(manifest_path)
    root = stock_tasks_dir()
    task_dir.mkdir(parents=True, exist_ok=True)
    for stock_name, spec in load_specs().items():
        meta = manifest.get(spec["prepared"])
        if meta is None:
            continue  # not prepared in this run: no config, so asking for it fails loudly
        old, new = spec["rename"]
        with atomic_dir(task_dir / new) as out:
            for stock_path, cfg in _stock_configs(root / spec["stock"]):
                cfg = _rename_config(cfg, old, new)
                if "task" in cfg and isinstance(cfg["task"], str):
                    cfg = _localise_dataset(cfg, _task_files(meta, cfg), prepared_dir, meta["eval_split"])
                name = cfg.get("task") if isinstance(cfg.get("task"), str) else cfg["group"]
                header = (
                    f"# Generated by layerfold.evaluation.harness.write_task_configs from the stock lm-eval config\n"
                    f"# {stock_path.relative_to(root)} ({old} -> {new}); edit the generator, not this file.\n"
                )
                _dump_yaml(cfg, out / f"{name}.yaml", header)
    return task_dir


# ----------------------------------------------------------------------------- evaluation


def lm_eval_tasks(tasks: list[str], local_task_dir: Path | None) -> tuple[list[str], TaskManager]:
    """lm-eval task names and the TaskManager that knows them.

    With ``local_task_dir`` (from :func:`write_task_configs`), stock names map to local ones
    (``piqa`` -> ``piqa_local``, ``mmlu`` -> ``mmlu_local``, ``mmlu_anatomy`` ->
    ``mmlu_local_anatomy``) and the TaskManager indexes only that directory (the stock index is not
    needed: Python hooks are imported by module path, and indexing thousands of stock YAMLs is slow).
    Without it, the names are returned unchanged with a default TaskManager (stock tasks, hub data).
    """
    from lm_eval.tasks import TaskManager

    if local_task_dir is None:
        return list(tasks), TaskManager()
    local_task_dir = Path(local_task_dir)
    if not local_task_dir.is_dir():
        raise FileNotFoundError(f"Local task directory {local_task_dir} does not exist; render it with write_task_configs.")
    manager = TaskManager(include_path=str(local_task_dir), include_defaults=False)
    known = set(manager.all_tasks)
    specs = load_specs()
    names = []
    for task in tasks:
        local = _local_name(task, specs)
        if local in known:
            names.append(local)
        elif task in known:  # already a local name
            names.append(task)
        else:
            raise KeyError(
                f"No local lm-eval task for {task!r} in {local_task_dir} (looked for {local!r}). Prepare it with "
                f"prepare_benchmarks and re-render with write_task_configs; known: {sorted(known)[:10]}..."
            )
    return names, manager


def _metric_value(value: Any) -> float | None:
    # lm-eval reports a stderr it could not compute as the string "N/A".
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _flatten(results: dict[str, Any], name: str, leaves: list[str]) -> dict[str, float | None]:
    """``{"acc,none": x, "acc_stderr,none": s}`` -> ``{"acc": x, "acc_stderr": s, "n": docs}``."""
    out: dict[str, float | None] = {}
    for key, value in results["results"][name].items():
        metric, _, filter_name = key.partition(",")
        if filter_name == "none":
            out[metric] = _metric_value(value)
    n_samples = results.get("n-samples", {})
    out["n"] = sum(n_samples[leaf]["effective"] for leaf in leaves if leaf in n_samples)
    return out


def _leaf_tasks(results: dict[str, Any], name: str) -> list[str]:
    """Leaf task names under ``name`` in a results dict (``name`` itself for a plain task)."""
    children = results.get("group_subtasks", {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaf_tasks(results, child)]


def _check_fewshot_source(name: str, shots: int, manager: TaskManager) -> None:
    """Refuse few-shot runs of local tasks whose shots could only come from the evaluation split."""
    entry = manager.task_index.get(name)
    if shots <= 0 or entry is None or entry.cfg is None or not isinstance(entry.cfg.get("task"), str):
        return  # groups (mmlu) have per-subtask fewshot splits
    if entry.cfg.get("fewshot_split") is None and entry.cfg.get("training_split") is None:
        raise ValueError(
            f"{name}: num_fewshot={shots} but no training/fewshot split is available offline, so lm-eval would "
            "draw the shots from the evaluation split. Use 0 shots for this task."
        )


# ----------------------------------------------------------------------------- quiet, seeded, sampled


LM_EVAL_LOGGERS = ("lm_eval", "datasets", "evaluate")


def quiet_lm_eval(log_file: str | Path | None) -> None:
    """Send lm-eval's (and ``datasets``') log lines to ``log_file`` instead of the console.

    lm-eval logs ~27 warning/info lines per evaluation (seed settings, num_fewshot overrides, chat
    template hints); they stay available in the file for debugging. Idempotent.
    """
    for name in LM_EVAL_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if getattr(h, "_layerfold", False)]:
            logger.removeHandler(handler)
            handler.close()
        logger.propagate = False
        if log_file is not None:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            handler._layerfold = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:  # datasets' own progress bars and "Generating split" lines
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - datasets is an lm-eval dependency
        pass


def sample_indices(task_name: str, n_docs: int, limit: int | float | None, seed: int) -> list[int] | None:
    """The documents ``eval.limit`` selects from a task of ``n_docs``: a seeded random subset, sorted.

    ``limit`` is a count (int) or a fraction (float < 1); None selects everything. The draw depends
    only on ``seed``, the task's name and its size, so the dense and every compressed model are
    scored on the same documents, and a subset is spread over the whole set instead of its first
    rows (HellaSwag's first 2,565 rows are all ActivityNet; BoolQ's first 20 are 85 % "yes").
    """
    if limit is None:
        return None
    if isinstance(limit, float) and not limit.is_integer():
        if not 0.0 < limit < 1.0:
            raise ValueError(f"eval.lm_eval.limit={limit}: a fraction must be in (0, 1); use an integer for a count.")
        count = math.ceil(limit * n_docs)
    else:
        count = int(limit)
        if count < 1:
            raise ValueError(f"eval.lm_eval.limit={limit}: must be >= 1 (or null for the full sets).")
    if count >= n_docs:
        return None
    rng = random.Random(f"{seed}:{task_name}:{n_docs}")  # string seeds hash deterministically across runs
    return sorted(rng.sample(range(n_docs), count))


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def request_cache_key(local_task_dir: Path | None) -> str:
    """What lm-eval's request cache must be keyed by, beyond its own key (task, shots, rank).

    lm-eval names a cached request file after the task name and shot count only, so edited task
    data or prompts would silently reuse stale requests. Requests are plain strings (no tokens), so
    they do not depend on the tokenizer or model and every model shares them; the key is therefore
    the lm-eval version, the rendered task YAMLs and the data files they read.
    """
    import lm_eval

    parts = [f"lm_eval={getattr(lm_eval, '__version__', '?')}"]
    if local_task_dir is not None:
        yamls = sorted(Path(local_task_dir).rglob("*.yaml"))
        data: set[Path] = set()
        for path in yamls:
            data.update(Path(m) for m in re.findall(r"(/[^\s'\",}]+\.jsonl)", path.read_text(encoding="utf-8")))
        # The YAMLs embed absolute data paths; hash their contents with the paths taken out so clones share caches.
        texts = [re.sub(r"/[^\s'\",}]+/", "", p.read_text(encoding="utf-8")) for p in yamls]
        parts.append(hashlib.sha256("\n".join(texts).encode()).hexdigest())
        parts.append(_file_digest(sorted(data)))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- evaluation


def compile_templates_once() -> None:
    """Make lm-eval compile each Jinja prompt template once per process instead of once per use.

    ``lm_eval.utils.apply_template`` calls ``env.from_string(template)`` on every render, and Jinja
    does not cache ``from_string``: building MMLU's 5-shot contexts spends ~97 % of its time
    re-parsing the same 2 templates (7 renders per question, ~12 ms each on a 2-core CPU;
    ``benchmarks/eval_breakdown.py``). A compiled template renders exactly as a freshly compiled
    one, so prompts are unchanged. Idempotent.
    """
    from lm_eval import utils

    env = utils.env
    if not getattr(env, "_layerfold_cached", False):
        env.from_string = functools.lru_cache(maxsize=1024)(env.from_string)  # type: ignore[method-assign]
        env._layerfold_cached = True  # type: ignore[attr-defined]


def _per_doc(samples: list[dict[str, Any]], metrics: list[str]) -> dict[str, list[float]]:
    """Per-document metric values ordered by document id (lm-eval's ``log_samples`` output)."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return {m: [float(s[m]) for s in ordered] for m in metrics if ordered and m in ordered[0]}


def _answers(tasks: dict[str, Any], samples: dict[str, list[dict[str, Any]]], leaves: list[str], n: int) -> dict[str, Any] | None:
    """Each document's chosen answer, gold answer and number of choices (multiple-choice tasks), and the
    task's floor (:func:`layerfold.evaluation.answers.answer_floor`), over ``leaves`` in document order;
    None where a document's answer cannot be recovered exactly (then nothing is stored for the task)."""
    from layerfold.evaluation.answers import answer_floor, chosen_answers, pack_digits, shared_labels, target_floor

    ordered = [(tasks[leaf], s) for leaf in leaves for s in sorted(samples.get(leaf, []), key=lambda s: s["doc_id"])]
    if not ordered or len(ordered) != n:
        return None
    kinds = {task.OUTPUT_TYPE for task, _ in ordered}
    if kinds == {"loglikelihood"}:  # LAMBADA: one target per document, greedy match or not
        return {"floor": target_floor([str(task.doc_to_target(s["doc"])) for task, s in ordered])}
    if kinds != {"multiple_choice"}:
        return None
    picked = [chosen_answers(task, s) for task, s in ordered]
    if any(p is None for p in picked):
        log.warning("answers of %s not stored: a document's answer could not be recovered exactly", ", ".join(leaves))
        return None
    labels = shared_labels([p["labels"] for p in picked])
    gold, choices = [p["gold"] for p in picked], [p["choices"] for p in picked]
    return {
        "chosen": {m: pack_digits([p[m] for p in picked]) for m in ("acc", "acc_norm")},
        "gold": pack_digits(gold),
        "choices": pack_digits(choices),
        "labels": labels,
        "floor": answer_floor(gold, choices, labels),
    }


def document_facts(tasks: list[str], local_task_dir: Path, limit: int | float | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per stock task, what its scored documents say without any model: ``{"n", "floor", "gold", "choices",
    "labels"}`` for multiple-choice tasks (gold index and number of choices per document, packed like
    ``answers``), ``{"n", "floor"}`` for LAMBADA-style ones. The documents are those ``eval.lm_eval.limit``
    and ``seed`` select (:func:`sample_indices`), in the order results list them, so results recorded before
    answers were stored can be read against them (their floor; a two-choice task's answers)."""
    from layerfold.evaluation.answers import answer_floor, gold_index, pack_digits, shared_labels, target_floor

    names, manager = lm_eval_tasks(tasks, local_task_dir)
    loaded = manager.load(names)["tasks"]
    facts: dict[str, dict[str, Any]] = {}
    for stock, name in zip(tasks, names):
        leaves = sorted(leaf for leaf in loaded if leaf == name or leaf.startswith(name + "_"))
        docs = []
        for leaf in leaves:
            task = loaded[leaf]
            all_docs = list(task.eval_docs)
            picked = sample_indices(leaf, len(all_docs), limit, seed)
            docs += [(task, all_docs[i]) for i in (range(len(all_docs)) if picked is None else picked)]
        if docs and all(task.OUTPUT_TYPE == "loglikelihood" for task, _ in docs):
            facts[stock] = {"n": len(docs), "floor": target_floor([str(task.doc_to_target(d)) for task, d in docs])}
            continue
        gold = [gold_index(task, d) for task, d in docs]
        if not docs or any(g is None for g in gold) or any(task.OUTPUT_TYPE != "multiple_choice" for task, _ in docs):
            continue
        choices = [task.doc_to_choice(d) for task, d in docs]
        labels = shared_labels(choices)
        counts = [len(c) for c in choices]
        facts[stock] = {"n": len(docs), "floor": answer_floor(gold, counts, labels), "gold": pack_digits(gold),  # type: ignore[arg-type]
                        "choices": pack_digits(counts), "labels": labels}
    return facts


# Per-document keys of a task's results: they go to the per-document output, not to the metrics file.
DOCUMENT_KEYS = ("per_doc", "doc_ids", "answers")


def split_documents(lm_eval_results: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``run_lm_eval``'s results as (aggregates per task, per-document data per task): the first is what
    a DVC metrics file holds (numbers), the second the plain per-document output."""
    aggregates = {task: {k: v for k, v in entry.items() if k not in DOCUMENT_KEYS} for task, entry in lm_eval_results.items()}
    documents = {task: {k: entry[k] for k in DOCUMENT_KEYS if k in entry} for task, entry in lm_eval_results.items()}
    return aggregates, documents


def merge_documents(metrics: dict[str, Any] | None, documents: dict[str, Any] | None) -> dict[str, Any] | None:
    """A metrics dict with each task's per-document data (an ``evaluate`` per-document output, whose
    ``lm_eval`` maps task -> per-document keys) put back beside its aggregates, as the readers use it.
    A metrics dict that still carries per-document data (older runs) is returned unchanged."""
    if metrics is None or not documents:
        return metrics
    per_task = documents.get("lm_eval") or {}
    lm_eval = {task: {**entry, **{k: v for k, v in (per_task.get(task) or {}).items() if k not in entry}}
               for task, entry in (metrics.get("lm_eval") or {}).items()}
    return {**metrics, "lm_eval": lm_eval} if lm_eval else metrics


def pack_bits(values: list[float], width: int = 100) -> list[str]:
    """0/1 values as rows of ``width`` characters: compact in JSON, and a list, which DVC's metrics
    views skip (they would otherwise show thousands of characters as one column)."""
    text = "".join("1" if v >= 0.5 else "0" for v in values)
    return [text[i:i + width] for i in range(0, len(text), width)] or [""]


def unpack_bits(rows: list[str]) -> list[float]:
    """Inverse of :func:`pack_bits`."""
    return [1.0 if c == "1" else 0.0 for c in "".join(rows)]


class LmEvalRunner:
    """lm-eval for one model after another in one process, with the work that does not depend on
    the model done once.

    - the task set (datasets read, YAMLs resolved) is built once per runner;
    - prompt templates are compiled once (:func:`compile_templates_once`);
    - built requests (few-shot contexts) go through lm-eval's request cache (``cache_requests``), stored
      as checked data-only files (:mod:`layerfold.evaluation.request_cache`, never lm-eval's pickles),
      in ``cache_dir/<key>`` where the key covers lm-eval's version, the task YAMLs and their data
      (:func:`request_cache_key`), so a later process reuses them and edited tasks never do;
    - requests are scored by :mod:`layerfold.evaluation.lm` (one pass per batch, same numbers as lm-eval);
    - request strings are tokenized in batches, each distinct string once, and kept per tokenizer in
      memory, so a further model with the same tokenizer skips tokenization and a different
      tokenizer never shares it; with ``cache_dir`` the tokens are also written next to the request
      cache (:func:`layerfold.evaluation.lm.token_cache_file`, data-only npz with a sha256), so the first
      model of a later process skips it too;
    - ``limit`` draws a seeded random subset per task (:func:`sample_indices`, lm-eval's
      ``samples=``), the same for every model;
    - lm-eval's seeds (python, numpy, torch, few-shot sampler) are set from ``seed`` before each model.

    Per-document correctness comes back with the results (``per_doc``) for paired standard errors, and
    each document's chosen answer, gold answer and number of choices (``answers``) for answer drift.
    """

    def __init__(
        self,
        tasks: list[str],
        num_fewshot: dict[str, int],
        local_task_dir: Path | None,
        *,
        limit: int | float | None = None,
        seed: int = 0,
        bootstrap_iters: int = 1000,
        cache_dir: Path | None = None,
        scoring: str = "vectorised",
        head_rows: str = "all",
        batch_tokens: int | None = None,
    ) -> None:
        self.tasks = list(tasks)
        self.limit, self.seed, self.bootstrap_iters, self.scoring = limit, seed, bootstrap_iters, scoring
        self.head_rows, self.batch_tokens = head_rows, batch_tokens
        self.names, self.manager = lm_eval_tasks(self.tasks, local_task_dir)
        self.by_shots: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for stock, name in zip(self.tasks, self.names):
            shots = int(num_fewshot.get(stock, 0))
            if local_task_dir is not None:
                _check_fewshot_source(name, shots, self.manager)
            self.by_shots[shots].append((stock, name))
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / request_cache_key(local_task_dir)
        self._loaded: dict[int, Any] = {}
        self._token_caches: dict[str, dict] = {}
        self._token_files_read: set[Path] = set()
        compile_templates_once()

    def _task_dict(self, shots: int) -> Any:
        if shots not in self._loaded:
            self._loaded[shots] = self.manager.load([name for _, name in self.by_shots[shots]])
        return self._loaded[shots]

    def samples(self, shots: int) -> dict[str, list[int]] | None:
        """lm-eval ``samples=``: leaf task -> sorted document indices, or None for the full sets."""
        picked = {}
        for name, task in self._task_dict(shots)["tasks"].items():
            indices = sample_indices(name, len(task.eval_docs), self.limit, self.seed)
            if indices is not None:
                picked[name] = indices
        return picked or None

    def _prepare(self, task_dict: Any, shots: int) -> None:
        """What ``simple_evaluate`` does before ``evaluate``: seeds and each task's shot count."""
        import numpy as np

        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        for task in task_dict["tasks"].values():
            if task.get_config("num_fewshot") != 0:  # a task config's explicit 0 wins, as in simple_evaluate
                task.set_config(key="num_fewshot", value=shots)
            task.set_fewshot_seed(seed=self.seed)

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int | str = 64,
        max_length: int | None = None,
        timings: dict[str, float] | None = None,
        phase_timer: Any = None,
    ) -> dict[str, dict[str, Any]]:
        """Scores of ``model`` per stock task name (see :func:`run_lm_eval` for the layout), each with
        ``per_doc`` (metric -> 0/1 per document, ordered by document id; group tasks concatenate their
        leaves), ``doc_ids`` (None for every document, else the sampled indices per leaf task) and
        ``answers`` (:func:`_answers`: chosen and gold answers per document, the task's floor).

        ``timings`` (if given) receives wall seconds per group of tasks sharing a shot count;
        ``phase_timer`` (benchmarks) has ``take()`` called after each group.
        """
        from lm_eval.caching import cache as request_cache
        from lm_eval.evaluator import evaluate

        from layerfold.evaluation import request_cache as data_only_request_cache

        token_cache = self._token_caches.setdefault(tokenizer_key(tokenizer), {})
        lm = make_lm(model, tokenizer, batch_size, max_length, token_cache, self.scoring, self.head_rows, self.batch_tokens)
        # A later process with the same tokenizer and task data reads the tokens instead of re-tokenizing.
        token_file = None if self.cache_dir is None else token_cache_file(self.cache_dir, lm)
        if token_file is not None and token_file not in self._token_files_read:
            load_token_cache(token_file, token_cache)
            self._token_files_read.add(token_file)
        cached_before = len(token_cache)
        report: dict[str, dict[str, Any]] = {}
        for shots, pairs in sorted(self.by_shots.items()):
            started = time.perf_counter()
            task_dict = self._task_dict(shots)
            samples = self.samples(shots)
            self._prepare(task_dict, shots)
            # lm-eval's cached requests ignore `samples` (a cache hit returns every document), so a
            # sampled run builds its few requests directly; full-set runs use the cache.
            use_cache = self.cache_dir is not None and samples is None
            if use_cache:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                request_cache.PATH = str(self.cache_dir)
                data_only_request_cache.install()  # lm-eval's own cache would unpickle (dill) whatever lies there
            results = evaluate(
                lm=lm, task_dict=task_dict, samples=samples, cache_requests=use_cache,
                bootstrap_iters=self.bootstrap_iters, log_samples=True,
            )
            if results is None:  # only non-zero ranks of a distributed run get None
                continue
            for stock, name in pairs:
                leaves = _leaf_tasks(results, name)
                entry: dict[str, Any] = _flatten(results, name, leaves)
                metrics = [m for m in ("acc", "acc_norm") if entry.get(m) is not None]
                per_doc: dict[str, list[float]] = {m: [] for m in metrics}
                for leaf in sorted(leaves):
                    for metric, values in _per_doc(results.get("samples", {}).get(leaf, []), metrics).items():
                        per_doc[metric].extend(values)
                entry["per_doc"] = {m: pack_bits(v) for m, v in per_doc.items() if len(v) == entry["n"]}
                entry["answers"] = _answers(task_dict["tasks"], results.get("samples", {}), sorted(leaves), entry["n"])
                # which documents: None = every one; else the sampled indices per leaf task (a dict of
                # lists, which DVC's metric views skip, like per_doc)
                entry["doc_ids"] = None if samples is None else {leaf: samples[leaf] for leaf in sorted(leaves) if leaf in samples}
                report[stock] = entry
                acc = entry.get("acc")
                if acc is None or not math.isfinite(acc):
                    log.warning("lm-eval returned no finite acc for %s (%s): %s", stock, name, entry)
            if timings is not None:
                timings[f"{shots}-shot"] = round(time.perf_counter() - started, 3)
            if phase_timer is not None and timings is not None:
                timings[f"{shots}-shot phases"] = phase_timer.take()  # type: ignore[assignment]
        if token_file is not None and len(token_cache) > cached_before:
            token_file.parent.mkdir(parents=True, exist_ok=True)
            save_token_cache(token_file, token_cache)
        return report


_RUNNERS: dict[tuple, LmEvalRunner] = {}


def shared_runner(
    tasks: list[str], num_fewshot: dict[str, int], local_task_dir: Path | None, *, limit: int | float | None,
    seed: int, bootstrap_iters: int, cache_dir: Path | None, scoring: str = "vectorised", head_rows: str = "all",
    batch_tokens: int | None = None,
) -> LmEvalRunner:
    """The process's :class:`LmEvalRunner` for these settings, so models evaluated one after another in
    one process (``scripts/run_methods.py``) share its task set and token caches. Task files are
    identified by content (:func:`request_cache_key`), not by the (temporary) folder they sit in."""
    key = (tuple(tasks), tuple(sorted((k, int(v)) for k, v in num_fewshot.items())), request_cache_key(local_task_dir),
           limit, seed, bootstrap_iters, None if cache_dir is None else str(cache_dir), scoring, head_rows, batch_tokens)
    if key not in _RUNNERS:
        _RUNNERS[key] = LmEvalRunner(tasks, num_fewshot, local_task_dir, limit=limit, seed=seed,
                                     bootstrap_iters=bootstrap_iters, cache_dir=cache_dir, scoring=scoring,
                                     head_rows=head_rows, batch_tokens=batch_tokens)
    return _RUNNERS[key]


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    num_fewshot: dict[str, int],
    batch_size: int | str,
    limit: int | float | None,
    local_task_dir: Path | None,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    cache_dir: Path | None = None,
    scoring: str = "vectorised",
    head_rows: str = "all",
    batch_tokens: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on ``tasks`` (stock names) with lm-eval; results keyed by stock name.

    Args:
        model, tokenizer: an in-memory Hugging Face causal LM and its tokenizer.
        tasks: stock task names (``piqa``, ..., ``mmlu``); mapped to local tasks when ``local_task_dir``.
        num_fewshot: shots per stock task name; missing tasks run zero-shot. lm-eval takes one
            ``num_fewshot`` per call, so tasks are evaluated in one ``evaluate`` per distinct value.
        batch_size, max_length: passed to ``HFLM``.
        limit: docs per task (int) or fraction (float < 1), drawn at random with ``seed``
            (:func:`sample_indices`); None for the full sets. For MMLU this is per subject.
        local_task_dir: output of :func:`write_task_configs`, or None for stock tasks from the hub.
        bootstrap_iters: bootstrap resamples for stderr of non-mean metrics (0 disables).
        seed: lm-eval's python/numpy/torch/few-shot seeds and the document sample.
        cache_dir: root of lm-eval's request cache (None: no cache).
        scoring: ``vectorised`` (default) or ``lm_eval`` (lm-eval's per-request loop), see
            :mod:`layerfold.evaluation.lm`; both give the same numbers.
        head_rows: ``all`` (default) or ``read``: where the vectorised scorer applies the LM head
            (:func:`layerfold.evaluation.lm.make_lm`).
        batch_tokens: None (lm-eval's ``batch_size``) or padded tokens per forward (vectorised only).

    Calls with the same settings in one process share one :func:`shared_runner`.

    Returns:
        ``{stock_name: {"acc": .., "acc_stderr": .., ["acc_norm": .., "acc_norm_stderr": ..,] "n": docs,
        "per_doc": {metric: packed 0/1 rows}, "doc_ids": None | {leaf: indices}, "answers": {"chosen":
        {metric: packed indices}, "gold": packed indices, "choices": packed counts, "labels": shared choice
        texts | None, "floor": {chance, majority, ...}} | {"floor": ...} (LAMBADA) | None}}`` with every
        metric the task defines (filter ``none``; LAMBADA adds ``perplexity``). For a group (mmlu) the
        metrics are the group aggregate and ``n`` is the number of docs over all its subtasks.
        Uncomputable stderrs are None. :func:`split_documents` separates the per-document keys.
    """
    runner = shared_runner(tasks, num_fewshot, local_task_dir, limit=limit, seed=seed, bootstrap_iters=bootstrap_iters,
                           cache_dir=cache_dir, scoring=scoring, head_rows=head_rows,
                           batch_tokens=batch_tokens)
    return runner.evaluate(model, tokenizer, batch_size, max_length)
