"""LmEvalRunner (template, request and token caches; seeded samples) scores every document exactly
as plain ``lm_eval.simple_evaluate`` + ``HFLM`` do, for a first model, a further one and a later process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from layerfold.data.benchmarks import prepare_benchmarks
from layerfold.evaluation.harness import LmEvalRunner, lm_eval_tasks, sample_indices, unpack_bits, write_task_configs

DATA_DIR = Path(os.environ.get("LAYERFOLD_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "datasets"))
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark files not found at {DATA_DIR}; set LAYERFOLD_DATA_DIR")
TASKS = ["openbookqa", "hellaswag", "mmlu"]
SHOTS = {"mmlu": 5}


def _tiny_model_and_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench")
    meta = prepare_benchmarks(DATA_DIR, out, ["openbookqa", "hellaswag", "mmlu"])
    task_dir = write_task_configs(out, out / "tasks")
    rows = (out / meta["openbookqa"]["data_files"][meta["openbookqa"]["eval_split"]]).read_text().splitlines()[:200]
    model, tokenizer = _tiny_model_and_tokenizer(rows)
    return task_dir, model, tokenizer


def _reference(model, tokenizer, task_dir: Path, runner: LmEvalRunner) -> dict[str, dict[str, list[float]]]:
    """Per-document acc/acc_norm from stock simple_evaluate + HFLM on the runner's documents."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32, max_length=1024)
    out: dict[str, dict[str, list[float]]] = {}
    for shots, pairs in sorted(runner.by_shots.items()):
        names, manager = lm_eval_tasks([stock for stock, _ in pairs], task_dir)
        results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, samples=runner.samples(shots), task_manager=manager,
                                          bootstrap_iters=0, log_samples=True, random_seed=0, numpy_random_seed=0,
                                          torch_random_seed=0, fewshot_random_seed=0)
        for leaf, samples in results["samples"].items():
            ordered = sorted(samples, key=lambda s: s["doc_id"])
            out[leaf] = {m: [float(s[m]) for s in ordered] for m in ("acc", "acc_norm") if m in ordered[0]}
    return out


def _flatten_reference(reference: dict, runner: LmEvalRunner, stock: str, metric: str) -> list[float]:
    name = dict(p for pairs in runner.by_shots.values() for p in pairs)[stock]
    leaves = sorted(leaf for leaf in reference if leaf == name or leaf.startswith(name + "_"))
    return [v for leaf in leaves for v in reference[leaf][metric]]


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="benchmark files not found")
def test_same_scores_as_stock_path_first_further_and_later_process(setup, tmp_path: Path) -> None:
    task_dir, model, tokenizer = setup
    # openbookqa: the full set (request cache used); hellaswag and MMLU 5-shot: seeded samples
    limit_runner = LmEvalRunner(["hellaswag", "mmlu"], SHOTS, task_dir, limit=2, seed=0, bootstrap_iters=0, cache_dir=tmp_path)
    full_runner = LmEvalRunner(["openbookqa"], SHOTS, task_dir, limit=None, seed=0, bootstrap_iters=0, cache_dir=tmp_path)
    reference = _reference(model, tokenizer, task_dir, limit_runner) | _reference(model, tokenizer, task_dir, full_runner)

    first = limit_runner.evaluate(model, tokenizer, batch_size=32, max_length=1024) | full_runner.evaluate(model, tokenizer, batch_size=32, max_length=1024)
    further = limit_runner.evaluate(model, tokenizer, batch_size=32, max_length=1024)  # warm tokens
    assert any(tmp_path.rglob("*.pickle"))  # the full-set run went through lm-eval's request cache
    later = LmEvalRunner(["openbookqa"], SHOTS, task_dir, limit=None, seed=0, bootstrap_iters=0, cache_dir=tmp_path)
    assert any(tmp_path.rglob("tokens-*.pkl"))  # and the tokens were written next to it
    further |= later.evaluate(model, tokenizer, batch_size=32, max_length=1024)  # a later process: warm requests and tokens

    assert first["openbookqa"]["n"] == 500 and first["hellaswag"]["n"] == 2 and first["mmlu"]["n"] == 57 * 2
    for stock in TASKS:
        for metric in ("acc", "acc_norm"):
            if metric not in first[stock]["per_doc"]:
                continue
            expected = _flatten_reference(reference, full_runner if stock == "openbookqa" else limit_runner, stock, metric)
            assert unpack_bits(first[stock]["per_doc"][metric]) == expected, (stock, metric)
            assert unpack_bits(further[stock]["per_doc"][metric]) == expected, (stock, metric)
            assert first[stock][metric] == further[stock][metric] == pytest.approx(sum(expected) / len(expected))


def test_sample_indices_are_seeded_spread_and_bounded() -> None:
    picked = sample_indices("hellaswag_local", 10042, 20, seed=0)
    assert picked == sample_indices("hellaswag_local", 10042, 20.0, seed=0)  # same for every model
    assert picked != sample_indices("hellaswag_local", 10042, 20, seed=1)
    assert picked != sample_indices("piqa_local", 10042, 20, seed=0)  # tasks drawn independently
    assert len(picked) == 20 == len(set(picked)) and picked == sorted(picked) and max(picked) > 2565  # not the first rows
    assert len(sample_indices("boolq", 3270, 0.1, seed=0)) == 327
    assert sample_indices("boolq", 10, 20, seed=0) is None  # more than the task has: the full set
    assert sample_indices("boolq", 10, None, seed=0) is None
    with pytest.raises(ValueError, match="limit"):
        sample_indices("boolq", 10, 0, seed=0)
