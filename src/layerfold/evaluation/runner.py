"""Running lm-eval over a model: :func:`run_lm_eval`, and :class:`LmEvalRunner` for one model after another
with the work that does not depend on the model done once (task sets, templates, request and token caches).

The tasks come from :mod:`layerfold.evaluation.task_configs`, the scores are computed by
:mod:`layerfold.evaluation.lm`, and each task's result is shaped by :mod:`layerfold.evaluation.results`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from layerfold.evaluation.lm import load_token_cache, make_lm, save_token_cache, token_cache_file, tokenizer_key
from layerfold.evaluation.results import task_result
from layerfold.evaluation.task_configs import check_fewshot_source, lm_eval_tasks, sample_indices

if TYPE_CHECKING:  # lm-eval is heavy to import; only the functions that need it import it.
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- quiet, cached


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
                check_fewshot_source(name, shots, self.manager)
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
                entry = task_result(results, task_dict["tasks"], name, samples)
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
