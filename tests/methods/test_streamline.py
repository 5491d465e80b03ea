"""LLM-Streamline: window selection from capture statistics, every replacement, and how each is saved."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import REPO, tiny_model
from layerfold.capture import BoundaryStatistics
from layerfold.config import RecoveryConfig
from layerfold.methods import MethodContext, compress
from layerfold.methods.streamline import window_scores
from layerfold.models import load_checkpoint, save_checkpoint
from layerfold.models.adapters import get_adapter
from layerfold.recovery import RecoveryEngine
from layerfold.surgery import LayerSurgeryError

L = 4  # layers of the tiny models


def constructed_stats(quiet: list[int], layers: int = L, hidden: int = 32) -> BoundaryStatistics:
    """Boundaries where each layer adds a large random update, except the ``quiet`` layers, which add almost nothing."""
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(2, 8, hidden, generator=g)]
    for i in range(layers):
        step = torch.randn(2, 8, hidden, generator=g) * (0.01 if i in quiet else 3.0)
        h.append(h[-1] + step)
    stats = BoundaryStatistics(num_boundaries=layers + 1)
    stats.update(torch.stack(h, dim=2))
    return stats


def run(model, replacement: str, num_remove: int, quiet: list[int]) -> dict:
    ctx = MethodContext(model, None, torch.zeros(1, 4, dtype=torch.long), constructed_stats(quiet, get_adapter(model).num_layers(model)))
    return compress(ctx, {"name": "streamline", "num_remove": num_remove, "replacement": replacement})


def test_window_score_is_mapped_mean_cosine():
    stats = constructed_stats([1, 2])
    scores = window_scores(stats.cosine, 2)
    assert scores.shape == (L - 1,)
    assert torch.allclose(scores, 0.5 + 0.5 * torch.diagonal(stats.cosine, offset=2))
    assert int(torch.argmax(scores)) == 1


@pytest.mark.parametrize("replacement, num_remove", [("transformer_layer", 1), ("ffn", 1), ("swiglu", 1), ("mlp", 1), ("none", 2)])
def test_selection_picks_the_constructed_window(replacement, num_remove):
    """Layers 1 and 2 do nothing: with a replacement the window is n + 1 = 2 layers, with none it is n = 2."""
    plan = run(tiny_model("llama"), replacement, num_remove, quiet=[1, 2])
    assert plan["details"]["window"] == [1, 2]
    assert len(plan["layers"]) == L - num_remove
    if replacement == "none":
        assert plan["removed"] == [1, 2] and plan["details"]["replacement_layer"] is None
    else:
        assert plan["layers"][1]["stands_for"] == [1, 2] and plan["details"]["replacement_layer"] == 1


def test_transformer_layer_is_the_first_pruned_layer():
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    run(model, "transformer_layer", 1, quiet=[1, 2])
    new, old = model.model.layers[1].state_dict(), dense.model.layers[1].state_dict()
    assert all(torch.equal(new[k], old[k]) for k in old)
    assert model.model.layers[2].self_attn.layer_idx == 2 and model.config.num_hidden_layers == 3


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0")))


@pytest.mark.parametrize("replacement", ["transformer_layer", "ffn", "swiglu", "none"])
def test_stock_replacements_load_with_plain_transformers(replacement, tmp_path):
    model = tiny_model("llama")
    run(model, replacement, 1, quiet=[1, 2])
    if replacement in ("ffn", "swiglu"):
        assert torch.count_nonzero(model.model.layers[1].self_attn.o_proj.weight) == 0
    save_checkpoint(model, _tokenizer(), tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (1, 8))
    assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6)


def test_mlp_replacement_round_trip(tmp_path):
    """The ReLU MLP lives in a side file: layerfold's loader restores it; plain transformers loads the rest."""
    model = tiny_model("llama")
    run(model, "mlp", 1, quiet=[1, 2])
    layer = model.model.layers[1]
    assert layer.mlp.fc1.weight.shape == (4 * 32, 32) and torch.count_nonzero(layer.self_attn.o_proj.weight) == 0
    save_checkpoint(model, _tokenizer(), tmp_path / "ckpt")
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3  # the saved model is untouched
    ids = torch.randint(0, 128, (1, 8))
    restored, _ = load_checkpoint(tmp_path / "ckpt")
    assert len(restored.model.layers) == 3 and restored.config.num_hidden_layers == 3
    assert torch.allclose(restored(ids).logits, model(ids).logits, atol=1e-6)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert plain.config.num_hidden_layers == 2  # pure pruning of the whole window, as the docstring says


@pytest.mark.parametrize("replacement", ["swiglu", "mlp"])
def test_replacement_the_architecture_cannot_express_is_an_error(replacement):
    model = tiny_model("opt")
    before = [id(l) for l in get_adapter(model).get_layers(model)]
    with pytest.raises(LayerSurgeryError, match=f"replacement={replacement}"):
        run(model, replacement, 1, quiet=[1, 2])
    assert [id(l) for l in get_adapter(model).get_layers(model)] == before  # nothing was edited


def test_ffn_replacement_on_opt_is_its_own_relu_ffn():
    plan = run(tiny_model("opt"), "ffn", 1, quiet=[1, 2])
    assert plan["details"]["attention_free_layers"] == [1]


@pytest.mark.parametrize("replacement", ["ffn", "mlp"])
def test_training_keeps_an_ffn_replacement_attention_free(replacement):
    """The engine trains the FFN of the replacement and never its (zero) attention branch."""
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    plan = run(model, replacement, 1, quiet=[1, 2])
    attention = {n: p.clone() for n, p in model.model.layers[1].self_attn.named_parameters()}
    mlp = {n: p.clone() for n, p in model.model.layers[1].mlp.named_parameters()}
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), OmegaConf.load(REPO / "conf/recovery/distill.yaml"))
    cfg.merge_with({"max_steps": 3, "batch_size": 2, "lr": 1e-2})
    data = torch.randint(0, 128, (8, 8), generator=torch.Generator().manual_seed(0))
    trained, summary = RecoveryEngine(model, dense, plan, cfg, data, data[:2], progress=False).run()
    assert summary["layers_trained"] == [1]
    layer = trained.model.layers[1]
    assert all(torch.equal(p, attention[n]) for n, p in layer.self_attn.named_parameters())
    assert any(not torch.equal(p, mlp[n]) for n, p in layer.mlp.named_parameters())
