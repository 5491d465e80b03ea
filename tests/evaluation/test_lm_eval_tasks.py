"""Offline lm-eval tasks: converted rows render exactly like the stock tasks; end-to-end on a tiny model.

Needs the public benchmark files (``$LAYERFOLD_DATA_DIR``, default ``<repo>/../shared/datasets``) and
no network: run with ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from layerfold.data.benchmarks import BENCHMARKS, prepare_benchmarks
from layerfold.evaluation.runner import run_lm_eval
from layerfold.evaluation.task_configs import lm_eval_tasks, stock_tasks_dir, write_task_configs

DATA_DIR = Path(os.environ.get("LAYERFOLD_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "datasets"))
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark files not found at {DATA_DIR}; set LAYERFOLD_DATA_DIR")

MMLU_SUBJECT = "anatomy"
# Stock config of each checked task, named here independently of the harness specs, and the
# number of shots its first-doc context is rendered with.
STOCK = {
    "piqa": ("piqa/piqa.yaml", 0),
    "hellaswag": ("hellaswag/hellaswag.yaml", 0),
    "winogrande": ("winogrande/default.yaml", 0),
    "arc_easy": ("arc/arc_easy.yaml", 0),
    "arc_challenge": ("arc/arc_challenge.yaml", 0),
    "boolq": ("super_glue/boolq/default.yaml", 0),
    "openbookqa": ("openbookqa/openbookqa.yaml", 0),
    f"mmlu_{MMLU_SUBJECT}": (f"mmlu/default/mmlu_{MMLU_SUBJECT}.yaml", 5),
    "lambada_openai": ("lambada/lambada_openai.yaml", 0),
}
ROWS = {
    "piqa": 1838,
    "winogrande": 1267,
    "hellaswag": 10042,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "boolq": 3270,
    "openbookqa": 500,
    "lambada_openai": 5153,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("benchmarks")
    return out, prepare_benchmarks(DATA_DIR, out, list(BENCHMARKS))


@pytest.fixture(scope="module")
def task_dir(prepared: tuple[Path, dict[str, dict]]) -> Path:
    out, _ = prepared
    return write_task_configs(out, out / "lm_eval_tasks")


@pytest.fixture(scope="module")
def local_tasks(task_dir: Path) -> dict[str, ConfigurableTask]:
    """Local tasks built by lm-eval's TaskManager from the rendered YAMLs, keyed by stock name."""
    names, manager = lm_eval_tasks(list(STOCK), task_dir)
    loaded = manager.load(names)["tasks"]
    return {stock: loaded[name] for stock, name in zip(STOCK, names)}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class _StockTaskOnLocalRows(ConfigurableTask):
    """The stock lm-eval task, config untouched; only ``download`` reads converted rows, not the hub."""

    def __init__(self, config: dict[str, Any], splits: dict[str, list[dict[str, Any]]]) -> None:
        self._local_splits = splits
        super().__init__(config=config)

    def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.dataset = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in self._local_splits.items()})


def _stock_task(stock: str, prepared: tuple[Path, dict[str, dict]]) -> ConfigurableTask:
    out, meta = prepared
    rel, _ = STOCK[stock]
    cfg = load_yaml(stock_tasks_dir() / rel, resolve_func=True)  # resolves include: and !function
    assert cfg["task"] == stock
    family = "mmlu" if stock.startswith("mmlu_") else stock
    files = meta[family]["data_files"]
    files = files[cfg["dataset_name"]] if family == "mmlu" else files
    rows = {split: _jsonl(out / path) for split, path in files.items()}
    eval_split = meta[family]["eval_split"]
    # Stock splits with no local file (e.g. piqa's train) only feed the few-shot sampler, which a
    # zero-shot render never calls; fill them with the eval rows so the stock constructor can run.
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) is not None:
            rows.setdefault(cfg[key], rows[eval_split])
    for key in ("tag", "group", "task_list"):  # as lm-eval's TaskFactory does before building a task
        cfg.pop(key, None)
    return _StockTaskOnLocalRows(cfg, rows)


# --------------------------------------------------------------------------- conversion


def test_missing_data_dir_names_env_var(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="LAYERFOLD_DATA_DIR") as err:
        prepare_benchmarks(tmp_path / "nowhere", tmp_path / "out", ["piqa"])
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(FileNotFoundError, match="LAYERFOLD_DATA_DIR") as err:
        prepare_benchmarks(tmp_path, tmp_path / "out", ["arc_easy"])  # directory exists, file does not
    assert str(tmp_path / "arc_easy" / "arc_easy.jsonl") in str(err.value)


@needs_data
def test_row_counts_and_manifest(prepared: tuple[Path, dict[str, dict]]) -> None:
    out, meta = prepared
    for task, rows in ROWS.items():
        assert meta[task]["rows"] == rows, task
        assert len(_jsonl(out / meta[task]["data_files"][meta[task]["eval_split"]])) == rows
        assert all(len(sha) == 64 for sha in meta[task]["sources"].values())
    assert len(meta["mmlu"]["data_files"]) == 57 and meta["mmlu"]["subjects"] == 57
    assert meta["mmlu"]["rows_by_split"] == {"test": 14042, "dev": 285}
    assert json.loads((out / "manifest.json").read_text())["piqa"]["rows"] == 1838


@needs_data
def test_prepare_converts_once(prepared: tuple[Path, dict[str, dict]]) -> None:
    out, meta = prepared
    path = out / meta["piqa"]["data_files"]["validation"]
    before = path.stat().st_mtime_ns
    assert prepare_benchmarks(DATA_DIR, out, ["piqa"])["piqa"] == meta["piqa"]
    assert path.stat().st_mtime_ns == before


# --------------------------------------------------------------------------- prompt parity


@needs_data
@pytest.mark.parametrize("stock", list(STOCK))
def test_local_task_renders_like_stock(stock: str, prepared: tuple[Path, dict[str, dict]], local_tasks: dict[str, ConfigurableTask]) -> None:
    local, reference = local_tasks[stock], _stock_task(stock, prepared)
    # Same prompt machinery: the local YAML carries the stock keys verbatim.
    for key in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "process_docs", "description",
                "target_delimiter", "fewshot_delimiter", "metric_list"):
        assert getattr(local.config, key) == getattr(reference.config, key), key
    _, shots = STOCK[stock]
    local_docs, reference_docs = local.eval_docs, reference.eval_docs
    assert len(local_docs) == len(reference_docs)
    for i in range(3):  # the first document, plus two more for good measure
        doc, ref = local_docs[i], reference_docs[i]
        assert local.doc_to_text(doc) == reference.doc_to_text(ref)
        if local.OUTPUT_TYPE == "multiple_choice":
            assert local.doc_to_choice(doc) == reference.doc_to_choice(ref)
        assert local.doc_to_target(doc) == reference.doc_to_target(ref)
        assert local.fewshot_context(doc, shots) == reference.fewshot_context(ref, shots)


@needs_data
def test_known_first_documents(local_tasks: dict[str, ConfigurableTask]) -> None:
    """Literal renders from the raw files, so a conversion bug fails even where both sides agree."""

    def first(stock: str) -> tuple[Any, list[str], Any]:
        task = local_tasks[stock]
        doc = task.eval_docs[0]
        return task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)

    text, choices, target = first("piqa")
    assert text == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert choices[0].startswith("Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper")
    assert target == 0

    text, choices, target = first("arc_easy")
    assert text == "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert choices[target] == "Sunlight is the source of energy for nearly all ecosystems."

    # Stock capitalises ctx_b: the recovered ctx_a/ctx_b split must give "He", as lm-eval on the hub data does.
    text, choices, target = first("hellaswag")
    assert text == "Roof shingle removal: A man is sitting on a roof. He"
    assert choices[target] == "starts pulling up roofing on a roof."

    text, choices, target = first("winogrande")
    assert (text, target) == (1, "always got the easier cases.")
    assert choices == ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]

    text, choices, target = first("boolq")
    assert text.startswith("All biomass goes through") and text.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert (choices, target) == (["no", "yes"], 0)

    text, choices, target = first("openbookqa")
    assert text.startswith("A person wants to start saving money") and choices[target] == "quit eating lunch out"

    task = local_tasks["lambada_openai"]
    doc = task.eval_docs[0]
    assert task.OUTPUT_TYPE == "loglikelihood"
    assert task.doc_to_text(doc).startswith("In my palm is a clear stone, and inside it is a small ivory statuette.")
    assert task.doc_to_text(doc).endswith("his mouth curved in a confident grin, I don't care about")
    assert task.doc_to_target(doc) == " signs"

    task = local_tasks[f"mmlu_{MMLU_SUBJECT}"]
    context = task.fewshot_context(task.eval_docs[0], 5)
    assert context.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
    )
    assert context.count("\nAnswer:") == 6
    assert context.endswith("D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:")


@needs_data
def test_mmlu_group_has_57_subjects(task_dir: Path) -> None:
    names, manager = lm_eval_tasks(["mmlu"], task_dir)
    assert names == ["mmlu_local"]
    loaded = manager.load(names)
    assert len(loaded["tasks"]) == 57
    assert all(name.startswith("mmlu_local_") for name in loaded["tasks"])
    assert sum(len(task.eval_docs) for task in loaded["tasks"].values()) == 14042
    assert set(loaded["groups"]) == {"mmlu_local", "mmlu_local_stem", "mmlu_local_other", "mmlu_local_social_sciences", "mmlu_local_humanities"}


# --------------------------------------------------------------------------- end to end


def _tiny_model_and_tokenizer(corpus: list[str]):
    """A random 2-layer Llama and a byte-level BPE trained on ``corpus``: all offline, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


@needs_data
def test_run_lm_eval_end_to_end(prepared: tuple[Path, dict[str, dict]], task_dir: Path) -> None:
    out, meta = prepared
    corpus = [json.dumps(row) for task in ("arc_easy", "hellaswag") for row in _jsonl(out / meta[task]["data_files"][meta[task]["eval_split"]])[:300]]
    corpus += [json.dumps(row) for row in _jsonl(out / "mmlu" / "dev" / f"{MMLU_SUBJECT}.jsonl")]
    model, tokenizer = _tiny_model_and_tokenizer(corpus)

    results = run_lm_eval(
        model, tokenizer, ["arc_easy", "hellaswag", "mmlu"], {"mmlu": 5}, batch_size=8, limit=4,
        local_task_dir=task_dir, max_length=512, bootstrap_iters=0,
    )
    assert set(results) == {"arc_easy", "hellaswag", "mmlu"}
    for task in ("arc_easy", "hellaswag"):
        assert results[task]["n"] == 4
        for key in ("acc", "acc_norm"):
            assert math.isfinite(results[task][key]) and 0.0 <= results[task][key] <= 1.0
            assert f"{key}_stderr" in results[task]
    assert results["mmlu"]["n"] == 57 * 4  # limit applies per subject
    assert math.isfinite(results["mmlu"]["acc"]) and "acc_norm" not in results["mmlu"]


@needs_data
def test_fewshot_without_train_split_is_refused(task_dir: Path) -> None:
    with pytest.raises(ValueError, match="evaluation split"):
        run_lm_eval(None, None, ["arc_easy"], {"arc_easy": 5}, batch_size=1, limit=1, local_task_dir=task_dir)
