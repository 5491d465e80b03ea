"""Which lm-eval tasks exist and where their documents come from: offline task configs, names, the document sample.

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
3. :func:`lm_eval_tasks` maps stock names to the local tasks; :func:`sample_indices` draws the documents
   ``eval.lm_eval.limit`` selects; :func:`document_facts` says what those documents hold without a model.

Without a local task directory the stock tasks (and the hub) are used unchanged. Running a model on the
tasks is :mod:`layerfold.evaluation.runner`; shaping lm-eval's output is :mod:`layerfold.evaluation.results`.
"""

from __future__ import annotations

import importlib
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from layerfold.io import atomic_dir, read_json

if TYPE_CHECKING:  # lm-eval is heavy to import; only the functions that need it import it.
    from lm_eval.tasks import TaskManager

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
                    f"# Generated by layerfold.evaluation.task_configs.write_task_configs from the stock lm-eval config\n"
                    f"# {stock_path.relative_to(root)} ({old} -> {new}); edit the generator, not this file.\n"
                )
                _dump_yaml(cfg, out / f"{name}.yaml", header)
    return task_dir


# ----------------------------------------------------------------------------- names


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


def check_fewshot_source(name: str, shots: int, manager: TaskManager) -> None:
    """Refuse few-shot runs of local tasks whose shots could only come from the evaluation split."""
    entry = manager.task_index.get(name)
    if shots <= 0 or entry is None or entry.cfg is None or not isinstance(entry.cfg.get("task"), str):
        return  # groups (mmlu) have per-subtask fewshot splits
    if entry.cfg.get("fewshot_split") is None and entry.cfg.get("training_split") is None:
        raise ValueError(
            f"{name}: num_fewshot={shots} but no training/fewshot split is available offline, so lm-eval would "
            "draw the shots from the evaluation split. Use 0 shots for this task."
        )


# ----------------------------------------------------------------------------- the document sample


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

