"""Layer removal on tiny random models of every supported family."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from layerfold.capture import capture_statistics
from layerfold.models import describe, get_adapter
from layerfold.models.adapters import UnsupportedArchitectureError
from layerfold.surgery import LayerSurgeryError, remove_layers


def test_adapter_names_resolve(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    assert len(layers) == 4
    for name in adapter.linears:
        assert isinstance(layers[0].get_submodule(name), torch.nn.Linear)
    for name in adapter.norms:
        assert layers[0].get_submodule(name) is not None
    model.get_submodule(adapter.final_norm)
    assert 0 < adapter.non_embedding_parameters(model) < describe(model)["params_total"]


def test_remove_save_reload_identical_logits(family, tmp_path):
    model = tiny_model(family)
    remove_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2
    attn = get_adapter(model).attention
    assert [layer.get_submodule(attn).layer_idx for layer in get_adapter(model).get_layers(model)] == [0, 1]
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert get_adapter(reloaded).num_layers(reloaded) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=0, atol=0)


def test_generate_with_kv_cache_after_removal(family):
    model = tiny_model(family)
    remove_layers(model, [0, 2])
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 14)
    assert torch.equal(cached, uncached)


def test_per_layer_config_lists_are_trimmed():
    model = tiny_model("qwen3")
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    remove_layers(model, [1])
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]


def test_removing_all_layers_is_refused():
    model = tiny_model("llama")
    with pytest.raises(LayerSurgeryError, match="at least one layer must remain"):
        remove_layers(model, [0, 1, 2, 3])
    with pytest.raises(LayerSurgeryError, match="out of range"):
        remove_layers(model, [7])
    assert model.config.num_hidden_layers == 4


def test_unsupported_architecture_names_the_fix():
    with pytest.raises(UnsupportedArchitectureError, match="LayerAdapter"):
        get_adapter("bert")


def test_capture_matches_brute_force_hidden_states(family):
    """Hook statistics equal cosines recomputed from output_hidden_states (all entries but the post-norm last)."""
    model = tiny_model(family)
    blocks = torch.randint(0, 128, (3, 10))
    stats = capture_statistics(model, blocks, batch_size=2, desc=None)
    with torch.no_grad():
        hs = model(input_ids=blocks, output_hidden_states=True).hidden_states
    layers = len(hs) - 1
    for i in range(layers - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean()
        assert stats.cosine[i, i + 1].item() == pytest.approx(cos.item(), abs=1e-5)
    assert stats.tokens == 30 and stats.sequences == 3
    assert stats.sample_features.shape == (layers + 1, 3, 32)
