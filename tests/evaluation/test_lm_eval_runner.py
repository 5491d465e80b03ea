"""LmEvalRunner (template, request and token caches; seeded samples) scores every document exactly
as plain ``lm_eval.simple_evaluate`` + ``HFLM`` do, for a first model, a further one and a later process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from layerfold.data.benchmarks import prepare_benchmarks
from layerfold.evaluation.answers import unpack_digits
from layerfold.evaluation.results import unpack_bits
from layerfold.evaluation.runner import LmEvalRunner
from layerfold.evaluation.task_configs import lm_eval_tasks, sample_indices, write_task_configs

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
    cached = list(tmp_path.rglob("*.requests.json.gz"))
    assert cached and not any(tmp_path.rglob("*.pickle"))  # the full-set run's requests, as data (never lm-eval's pickles)
    later = LmEvalRunner(["openbookqa"], SHOTS, task_dir, limit=None, seed=0, bootstrap_iters=0, cache_dir=tmp_path)
    assert any(tmp_path.rglob("tokens-*.npz"))  # and the tokens were written next to it
    # a pickle planted where lm-eval's own request cache would be read runs nothing in a later process
    marker = tmp_path / "code-ran"
    _plant_pickles(cached, marker)
    further |= later.evaluate(model, tokenizer, batch_size=32, max_length=1024)  # a later process: warm requests and tokens
    assert not marker.exists()

    assert first["openbookqa"]["n"] == 500 and first["hellaswag"]["n"] == 2 and first["mmlu"]["n"] == 57 * 2
    for stock in TASKS:
        for metric in ("acc", "acc_norm"):
            if metric not in first[stock]["per_doc"]:
                continue
            expected = _flatten_reference(reference, full_runner if stock == "openbookqa" else limit_runner, stock, metric)
            assert unpack_bits(first[stock]["per_doc"][metric]) == expected, (stock, metric)
            assert unpack_bits(further[stock]["per_doc"][metric]) == expected, (stock, metric)
            assert first[stock][metric] == further[stock][metric] == pytest.approx(sum(expected) / len(expected))
            # each document's stored answer is the one lm-eval scored: right exactly where the 0/1 says so
            answers = first[stock]["answers"]
            chosen, gold = unpack_digits(answers["chosen"][metric]), unpack_digits(answers["gold"])
            assert [float(c == g) for c, g in zip(chosen, gold)] == expected, (stock, metric)
        floor = first[stock]["answers"]["floor"]
        assert floor["n"] == first[stock]["n"] and floor["chance"] == pytest.approx(0.25) and floor["majority"] >= 0.25


def _plant_pickles(cached: list[Path], marker: Path) -> None:
    """At every request-cache key the run wrote: a pickle that creates ``marker`` when loaded, where
    lm-eval's own (dill) cache would read it."""
    import pickle

    from lm_eval.caching import cache

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for path in cached:
        key = path.name.removesuffix(".requests.json.gz")
        (path.parent / Path(cache._cache_file_path(key)).name).write_bytes(pickle.dumps(Payload()))


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


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="benchmark files not found")
def test_lambada_requests_score_as_lm_eval_scores_them(tmp_path: Path) -> None:
    """LAMBADA is a log-likelihood task: its accuracy is whether every token of the target word is the greedy
    one (multi-token continuations). The vectorised scorer must return lm-eval's own (log-likelihood,
    is-greedy) for each of its requests, greedy ones included, and the same document results end to end."""
    from layerfold.evaluation.lm import make_lm

    meta = prepare_benchmarks(DATA_DIR, tmp_path / "bench", ["lambada_openai"])
    task_dir = write_task_configs(tmp_path / "bench", tmp_path / "tasks")
    rows = (tmp_path / "bench" / meta["lambada_openai"]["data_files"]["test"]).read_text().splitlines()[:300]
    model, tokenizer = _tiny_model_and_tokenizer(rows)
    names, manager = lm_eval_tasks(["lambada_openai"], task_dir)
    (task,) = manager.load(names)["tasks"].values()
    task.build_all_requests(samples=sample_indices(names[0], len(task.eval_docs), 40, 0))
    requests = list(task.instances)
    assert len(requests) == 40 and all(r.request_type == "loglikelihood" for r in requests)
    # and continuations that are the model's own greedy tokens, so that is-greedy is true for some
    from lm_eval.api.instance import Instance

    for request in requests[:12]:
        context = request.args[0]
        ids = tokenizer(context, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1]:]
        requests.append(Instance("loglikelihood", {}, (context, tokenizer.decode(greedy)), 0, ("lambada_greedy", 0, 1)))
    stock = make_lm(model, tokenizer, 8, 512, None, scoring="lm_eval").loglikelihood(requests, disable_tqdm=True)
    fast = make_lm(model, tokenizer, 8, 512, None, scoring="vectorised").loglikelihood(requests, disable_tqdm=True)
    cached = make_lm(model, tokenizer, 8, 512, {}, scoring="vectorised").loglikelihood(requests, disable_tqdm=True)
    assert fast == stock == cached  # exact floats and greedy flags, request by request
    assert any(greedy for _, greedy in stock[40:])
    # end to end: the same per-document accuracy, perplexity and floor with either scorer
    results = {mode: LmEvalRunner(["lambada_openai"], {}, task_dir, limit=40, seed=0, bootstrap_iters=0, scoring=mode)
               .evaluate(model, tokenizer, batch_size=8, max_length=512)["lambada_openai"] for mode in ("lm_eval", "vectorised")}
    assert results["vectorised"]["per_doc"] == results["lm_eval"]["per_doc"]
    assert results["vectorised"]["perplexity"] == results["lm_eval"]["perplexity"] and results["lm_eval"]["n"] == 40
    floor = results["vectorised"]["answers"]["floor"]
    assert floor["chance"] == 0.0 and 0.0 < floor["majority"] < 0.2 and floor["n"] == 40
