"""lm-eval scored layer by layer: every request's log-likelihood and greedy flag equal to the resident run's.

The requests are those of ``tests/evaluation/test_vectorised_scoring.py`` (independent continuations, multiple
choice groups sharing a context, left truncation, a greedy continuation). The resident run is layerfold's
vectorised scorer on the whole model; the layer-by-layer one reads the same checkpoint one layer at a time,
carrying chunks of requests through the layers together.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))

from test_vectorised_scoring import VOCAB, _requests, _tokenizer  # noqa: E402

from layerfold.evaluation.lm import make_lm  # noqa: E402
from layerfold.evaluation.lm_eval_layerwise import LayerwiseModel  # noqa: E402
from layerfold.evaluation.lm_eval_layerwise import refusal  # noqa: E402
from layerfold.models import save_checkpoint  # noqa: E402

CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256),
    "qwen3": lambda: Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, max_position_embeddings=256),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (conftest.one_thread)."""


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()
    path = tmp_path_factory.mktemp(request.param) / "checkpoint"
    save_checkpoint(model, _tokenizer(), path, dtype=torch.float32)
    return path, model


def hardware(**values) -> dict:
    return {"mode": "sequential", "activations": "device", "activation_share": 0.5, "prefetch": False, **values}


@pytest.mark.parametrize("batch_size, batch_tokens, chunk_tokens, activations", [
    (7, None, None, "device"),  # every request in one chunk
    (7, None, 200, "host"),  # chunks of a few batches, boundaries in host memory
    (1, None, 64, "device"),  # one request per batch, several batches per chunk
    (8, 300, 500, "device"),  # batches cut by padded tokens
])
def test_every_request_scores_as_resident(checkpoint, batch_size, batch_tokens, chunk_tokens, activations):
    path, model = checkpoint
    requests = _requests(model)
    resident = make_lm(model, _tokenizer(), batch_size, 48, None, batch_tokens=batch_tokens)._loglikelihood_tokens(requests, disable_tqdm=True)
    source = LayerwiseModel.from_checkpoint(path, hardware(eval_chunk_tokens=chunk_tokens, activations=activations), "cpu", torch.float32)
    lm = make_lm(source, _tokenizer(), batch_size, 48, None, batch_tokens=batch_tokens)
    layerwise = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert layerwise == resident  # floats compared exactly, request by request
    assert any(greedy for _, greedy in layerwise) and not all(greedy for _, greedy in layerwise)
    report = lm.layerwise_report
    assert report.activations == activations
    layers = model.config.num_hidden_layers
    assert report.layers_run % layers == 0 and (report.layers_run // layers > 1) == (chunk_tokens is not None)  # read once per chunk


def test_the_scorer_is_refused_where_it_needs_the_whole_model():
    assert "scoring=vectorised" in refusal("lm_eval", "all", 8)
    assert "head_rows=all" in refusal("vectorised", "read", 8)
    assert "batch_size=auto" in refusal("vectorised", "all", "auto")
    assert refusal("vectorised", "all", 8) is None


def test_the_suite_through_the_harness_scores_every_document_as_resident(tmp_path):
    """The real harness on local task files (hellaswag and MMLU 5-shot samples, ARC-Easy): the same per-document
    acc / acc_norm, and the same aggregates, resident and layer by layer."""
    from test_lm_eval_runner import DATA_DIR, _tiny_model_and_tokenizer

    from layerfold.data.benchmarks import prepare_benchmarks
    from layerfold.evaluation.runner import LmEvalRunner
    from layerfold.evaluation.task_configs import write_task_configs

    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark files not found at {DATA_DIR}; set LAYERFOLD_DATA_DIR")
    tasks = ["hellaswag", "mmlu", "arc_easy"]
    meta = prepare_benchmarks(DATA_DIR, tmp_path / "bench", tasks)
    task_dir = write_task_configs(tmp_path / "bench", tmp_path / "tasks")
    rows = (tmp_path / "bench" / meta["hellaswag"]["data_files"][meta["hellaswag"]["eval_split"]]).read_text().splitlines()[:100]
    model, tokenizer = _tiny_model_and_tokenizer(rows)
    save_checkpoint(model, tokenizer, tmp_path / "checkpoint", dtype=torch.float32)
    runner = LmEvalRunner(tasks, {"mmlu": 5}, task_dir, limit=3, seed=0, bootstrap_iters=0, cache_dir=None)
    resident = runner.evaluate(model, tokenizer, batch_size=16, max_length=1024)
    source = LayerwiseModel.from_checkpoint(tmp_path / "checkpoint", hardware(eval_chunk_tokens=4096), "cpu", torch.float32)
    layerwise = runner.evaluate(source, tokenizer, batch_size=16, max_length=1024)
    assert resident.keys() == layerwise.keys() and resident["mmlu"]["n"] == 57 * 3
    for task in tasks:
        assert layerwise[task]["per_doc"] == resident[task]["per_doc"], task
        assert layerwise[task]["acc"] == resident[task]["acc"] and layerwise[task]["acc_stderr"] == resident[task]["acc_stderr"]


def test_validate_refuses_lm_eval_settings_that_need_the_whole_model():
    from conftest import REPO

    from layerfold.config import ConfigError, compose, parse_params
    from layerfold.validation import check

    layerwise = ["hardware=sequential", "eval.efficiency.enabled=false"]
    with pytest.raises(ConfigError, match="eval.lm_eval.head_rows=read.*head_rows=all"):
        check(parse_params(compose(REPO / "conf", [*layerwise, "eval.lm_eval.head_rows=read"])), None)
    check(parse_params(compose(REPO / "conf", layerwise)), None)
    check(parse_params(compose(REPO / "conf", ["hardware=sequential", "eval.lm_eval.head_rows=read"])), None)  # resident lm-eval
