"""Every document of every local lm-eval task renders exactly as the stock task renders it.

For each task the stock-schema rows are rebuilt here from the raw public files, independently of
:mod:`layerfold.data.benchmarks`, and rendered by the *stock* lm-eval task (stock YAML, stock
``process_docs``/``doc_to_*``); the same documents are rendered by the local task that
:func:`~layerfold.evaluation.task_configs.write_task_configs` generates from the converter's files. Prompt,
choices and target must agree on every document. Where the raw files lack what the stock rows hold
(BoolQ's passage titles, the HellaSwag tags the llama.cpp dump removed) the rebuilt rows lack it too,
so those documents are counted instead, and the counts must equal the documented ones.

Needs the public benchmark files (``$LAYERFOLD_DATA_DIR``, default ``<repo>/../shared/datasets``).
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import datasets
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from layerfold.data.benchmarks import BOOLQ_NOTITLE_DOCS, HELLASWAG_WIKIHOW_DOCS, LAMBADA_OPENAI_DOCS, MMLU_SUBJECTS, prepare_benchmarks
from layerfold.evaluation.task_configs import lm_eval_tasks, stock_tasks_dir, write_task_configs

DATA_DIR = Path(os.environ.get("LAYERFOLD_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "datasets"))
pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark files not found at {DATA_DIR}; set LAYERFOLD_DATA_DIR")

Rows = list[dict[str, Any]]


# --------------------------------------------------------------------------- stock rows from raw files


def _jsonl(path: Path) -> Rows:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _piqa() -> Rows:
    labels = (DATA_DIR / "piqa" / "valid-labels.lst").read_text().split()
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(_jsonl(DATA_DIR / "piqa" / "valid.jsonl"), labels)]


def _winogrande() -> Rows:
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(r["answer"])} for r in _jsonl(DATA_DIR / "winogrande" / "dev.jsonl")]


def _mosaic(name: str, question_key: str, strip: str = "") -> Rows:
    rows = []
    for r in _jsonl(DATA_DIR / name / f"{name if name != 'openbookqa' else 'openbook_qa'}.jsonl"):
        labels = [chr(65 + i) for i in range(len(r["choices"]))]
        rows.append({question_key: r["query"].removeprefix(strip), "choices": {"text": r["choices"], "label": labels}, "answerKey": labels[r["gold"]]})
    return rows


def _boolq() -> Rows:
    """super_glue rows as far as the file allows: the ``"<title> -- "`` passage prefix is not in it."""
    rows = []
    for i, r in enumerate(_jsonl(DATA_DIR / "boolq" / "boolq.jsonl")):
        passage, question = re.fullmatch(r"Passage: (.*)\nQuestion: (.*)\?", r["query"], flags=re.S).groups()
        rows.append({"passage": passage.replace("\nQuestion", " question"), "question": question, "idx": i, "label": r["gold"]})
    return rows


def _hellaswag() -> tuple[Rows, int]:
    """Rowan/hellaswag rows rebuilt from the dump, and how many are WikiHow (``ctx_b`` empty).

    ActivityNet contexts end in the lower-case fragment that is ``ctx_b``; WikiHow contexts end with
    a full sentence. The dump's text went through one collapse of double spaces already, so a double
    space in it came from a run that stock collapses once too: three spaces in the stock row.
    """
    lines = bz2.open(DATA_DIR / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8").read().splitlines()
    rows, wikihow = [], 0
    for i in range(0, len(lines), 6):
        label, ctx = lines[i].split(": ", 1)
        complete = re.search(r"[.?!][\"')\]]*$", ctx)
        fragment = None if complete else re.fullmatch(r"(.*[.?!][\"')\]]*) ([^.?!]*)", ctx)
        ctx_a, ctx_b = fragment.groups() if fragment else (ctx, "")
        wikihow += ctx_b == ""
        rows.append(
            {
                "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx, "label": lines[i + 1],
                "endings": [e.replace("  ", "   ") for e in lines[i + 2 : i + 6]], "split": "val",
            }
        )
    return rows, wikihow


def _lambada() -> Rows:
    """EleutherAI/lambada_openai rows: the passage, whose last space-separated word is the target."""
    return [{"text": f"{r['context']} {r['continuation']}"} for r in _jsonl(DATA_DIR / "lambada_openai" / "lambada_openai.jsonl")]


def _mmlu(subject: str) -> dict[str, Rows]:
    def read(split: str) -> Rows:
        with open(DATA_DIR / "mmlu" / split / f"{subject}_{split}.csv", encoding="utf-8", newline="") as handle:
            return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(y)} for q, a, b, c, d, y in csv.reader(handle)]

    return {"test": read("test"), "dev": read("dev")}


# --------------------------------------------------------------------------- both renders


class _StockTask(ConfigurableTask):
    """The stock lm-eval task with its config untouched; ``download`` returns the rebuilt rows."""

    def __init__(self, config: dict[str, Any], splits: dict[str, Rows]) -> None:
        self._splits = splits
        super().__init__(config=config)

    def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.dataset = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in self._splits.items()})


def _stock_task(rel: str, eval_rows: Rows, extra: dict[str, Rows] | None = None) -> ConfigurableTask:
    cfg = load_yaml(stock_tasks_dir() / rel, resolve_func=True)
    splits = dict(extra or {})
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) is not None:
            splits.setdefault(cfg[key], eval_rows)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    return _StockTask(cfg, splits)


def _render(task: ConfigurableTask) -> list[tuple[Any, Any, Any]]:
    choices = task.doc_to_choice if task.OUTPUT_TYPE == "multiple_choice" else lambda d: None
    return [(task.doc_to_text(d), choices(d), task.doc_to_target(d)) for d in task.eval_docs]


def _mismatches(local: ConfigurableTask, stock: ConfigurableTask) -> list[int]:
    a, b = _render(local), _render(stock)
    assert len(a) == len(b)
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("fidelity")
    prepare_benchmarks(DATA_DIR, out, ["piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "boolq", "openbookqa", "mmlu",
                                       "lambada_openai"])
    task_dir = write_task_configs(out, out / "tasks")

    def load(names: list[str]) -> dict[str, ConfigurableTask]:
        resolved, manager = lm_eval_tasks(names, task_dir)
        return manager.load(resolved)["tasks"]

    return load


SIMPLE = {
    "piqa": ("piqa/piqa.yaml", _piqa),
    "winogrande": ("winogrande/default.yaml", _winogrande),
    "arc_easy": ("arc/arc_easy.yaml", lambda: _mosaic("arc_easy", "question", "Question: ")),
    "arc_challenge": ("arc/arc_challenge.yaml", lambda: _mosaic("arc_challenge", "question", "Question: ")),
    "openbookqa": ("openbookqa/openbookqa.yaml", lambda: _mosaic("openbookqa", "question_stem")),
    "lambada_openai": ("lambada/lambada_openai.yaml", _lambada),
}


@pytest.mark.parametrize("name", list(SIMPLE))
def test_every_document_renders_as_stock(name: str, local) -> None:
    rel, rows = SIMPLE[name]
    (task,) = local([name]).values()
    stock = _stock_task(rel, rows())
    assert len(task.eval_docs) == len(stock.eval_docs) > 400
    assert _mismatches(task, stock) == []
    if name == "lambada_openai":  # the prompt is the passage without its last word, the target that word with its space
        assert len(task.eval_docs) == LAMBADA_OPENAI_DOCS
        assert all(task.doc_to_text(d) + task.doc_to_target(d) == d["text"] for d in task.eval_docs)


def test_hellaswag_every_document_and_the_wikihow_count(local) -> None:
    (task,) = local(["hellaswag"]).values()
    rows, wikihow = _hellaswag()
    stock = _stock_task("hellaswag/hellaswag.yaml", rows)
    assert len(task.eval_docs) == 10042
    assert _mismatches(task, stock) == []
    # Stock renders a tag-initial WikiHow ending with a leading space the dump cannot show: these
    # documents match the rebuilt rows but cannot be checked against the original ones.
    assert wikihow == HELLASWAG_WIKIHOW_DOCS
    # The one ActivityNet context that starts like a WikiHow title still gets its ctx_b capitalised.
    texts = [task.doc_to_text(d) for d in task.eval_docs]
    assert sum(t.startswith("Cleaning windows: How to clean your rv windows") and t.endswith("spray. You") for t in texts) == 1
    # The dump's one double space survives the stock collapse at eval time.
    assert sum("bed.  Do not be" in c for d in task.eval_docs for c in task.doc_to_choice(d)) == 1


def test_boolq_is_named_no_title_and_differs_on_every_document(local) -> None:
    tasks = local(["boolq_notitle"])
    assert list(tasks) == ["boolq_notitle"]
    (task,) = tasks.values()
    rows = _boolq()
    assert _mismatches(task, _stock_task("super_glue/boolq/default.yaml", rows)) == []
    # Stock prompts start with "<title> -- " and the rebuilt rows have no title: every local prompt
    # starts with the bare passage instead, so all documents differ from stock.
    prompts = [task.doc_to_text(d) for d, row in zip(task.eval_docs, rows) if task.doc_to_text(d).startswith(row["passage"])]
    assert len(prompts) == BOOLQ_NOTITLE_DOCS
    assert task.doc_to_text(task.eval_docs[0]).startswith("All biomass goes through")


def test_mmlu_every_subject_every_document(local) -> None:
    tasks = local(["mmlu"])
    checked = 0
    for subject in MMLU_SUBJECTS:
        splits = _mmlu(subject)
        stock = _stock_task(f"mmlu/default/mmlu_{subject}.yaml", splits["test"], {"dev": splits["dev"]})
        task = tasks[f"mmlu_local_{subject}"]
        assert _mismatches(task, stock) == [], subject
        doc, ref = task.eval_docs[0], stock.eval_docs[0]
        assert task.fewshot_context(doc, 5) == stock.fewshot_context(ref, 5), subject
        checked += len(task.eval_docs)
    assert checked == 14042
