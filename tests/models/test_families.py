"""Every model family on a tiny random config: adapters resolve, removal leaves a model that reloads and
generates with the KV cache exactly like a model built from the trimmed config with the kept weights."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from layerfold.models import layer_config
from layerfold.models.adapters import ADAPTERS, LogitsHead, UnsupportedArchitectureError, discover_adapter, get_adapter, logits_head, meta_model
from layerfold.models.tiny import DISCOVERED_FAMILIES, MOE_FAMILIES, TINY_FAMILIES, eager, tiny_config, tiny_model
from layerfold.surgery import remove_layers

FAMILIES = sorted(TINY_FAMILIES)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models only (see conftest.one_thread)."""


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_resolve(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.generic == (family in DISCOVERED_FAMILIES)
    assert (family in ADAPTERS) != adapter.generic
    layers = adapter.get_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 4
    assert model.get_submodule(adapter.embed) is model.get_input_embeddings()
    assert list(model.get_submodule(adapter.final_norm).parameters())
    # The adapter lists every linear of every layer (LoRA's targets; a router is no plain linear) and every norm;
    # names of alternatives (DeepSeek's q_proj or q_a_proj/q_b_proj, dense MLP or shared experts) may be absent.
    linears = {n for layer in layers for n, m in layer.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    assert linears - {adapter.router} == {n for n in adapter.linears if any(_has(layer, n) for layer in layers)}
    norms = {n for layer in layers for n, m in layer.named_modules() if "norm" in type(m).__name__.lower() and list(m.parameters(recurse=False))}
    assert norms == {n for n in adapter.norms if any(_has(layer, n) for layer in layers)}
    for name, _ in adapter.head_rows + adapter.channel_rows:
        assert all(_has(layer, name) for layer in layers), name
    assert bool(adapter.attn_output) != adapter.generic  # a discovered adapter does not name it
    assert not adapter.attn_output or all(_has(layer, adapter.attn_output) for layer in layers)
    if adapter.mlp_output and family not in MOE_FAMILIES:  # a stack of MoE layers only has no dense MLP output
        assert all(_has(layer, adapter.mlp_output) for layer in layers)
    if family in MOE_FAMILIES:
        moe = [layer for layer in layers if _has(layer, adapter.experts)]
        assert moe and all(_has(layer, adapter.router) for layer in moe)
        assert all(p.dim() == 3 for p in moe[0].get_submodule(adapter.experts).parameters())  # expert first
    # Every tensor of a layer is either merged or a norm's (kept from the base layer).
    state = layers[-1].state_dict()
    assert set(adapter.merged_keys(state)) | {k for k in state if adapter.is_norm_key(k)} == set(state)
    assert 0 < adapter.non_embedding_parameters(model) < sum(p.numel() for p in model.parameters())


def _has(layer: nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
        return True
    except AttributeError:
        return False


# Which layers to remove: the first (every later index shifts) and a middle one; for stacks that mix layer
# kinds, this also changes how many dense layers come first / which layers are MoE.
REMOVALS = [[0, 2], [1]]


def _generate(model: nn.Module, ids: torch.Tensor, cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=cache, pad_token_id=0)


@pytest.mark.parametrize("removed", REMOVALS, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_removal_reloads_and_generates_like_the_trimmed_config(family: str, removed: list[int], tmp_path) -> None:
    model = tiny_model(family, dtype=torch.float64)
    original = model.config.to_dict()
    keep = [i for i in range(4) if i not in removed]
    kept_weights = {i: {k: v.clone() for k, v in get_adapter(model).get_layers(model)[i].state_dict().items()} for i in keep}
    remove_layers(model, removed)
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    assert model.config.num_hidden_layers == len(layers) == len(keep)
    assert layer_config.layer_mismatches(list(layers), model.config) == []
    assert all(m.layer_idx == k for k, layer in enumerate(layers) for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int))

    # A reference: the model transformers builds from the trimmed config, holding the kept layers' weights.
    reference_config = layer_config.trimmed(AutoConfig.for_model(**original), keep)
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(reference_config, dtype=torch.float64, **eager(family)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(adapter.layers + ".")}
    for new, old in enumerate(keep):
        state.update({f"{adapter.layers}.{new}.{k}": v for k, v in kept_weights[old].items()})
    reference.load_state_dict(state, strict=True)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, **eager(family)).eval()
    assert reloaded.config.num_hidden_layers == len(keep)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same float64 arithmetic up to summation order (memory layouts differ after a reload)
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(reference(input_ids=ids).logits, logits, rtol=1e-10, atol=1e-12)
    cached = _generate(model, ids, cache=True)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, _generate(model, ids, cache=False))
    assert torch.equal(cached, _generate(reloaded, ids, cache=True))
    assert torch.equal(cached, _generate(reference, ids, cache=True))


# Config entries about layers ---------------------------------------------------------------------------
PATTERNS = {
    "qwen2_moe": dict(decoder_sparse_step=2, mlp_only_layers=[3]),  # sparse: (i + 1) % 2 == 0 and not 3, i.e. layer 1 only
    "qwen3_moe": dict(decoder_sparse_step=2),
    "deepseek_v3": dict(first_k_dense_replace=2),
    "llama4_text": dict(interleave_moe_layer_step=2, moe_layers=None, no_rope_layer_interval=3, no_rope_layers=None, layer_types=None),
    "smollm3": dict(no_rope_layer_interval=3, no_rope_layers=None),
    "gemma3_text": dict(layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
    "qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=2, layer_types=None),
}


def _patterned(family: str):
    values = {**tiny_config(family).to_dict(), **PATTERNS[family]}
    return AutoConfig.for_model(**values)


@pytest.mark.parametrize("family", sorted(PATTERNS))
def test_every_removal_keeps_the_config_describing_the_layers(family: str) -> None:
    """All 14 removals of 1-3 of 4 layers, on configs whose layer kinds follow a pattern (period, dense prefix, interval)."""
    config = _patterned(family)
    skeleton = meta_model(config)
    layers = list(get_adapter(skeleton).get_layers(skeleton))
    kinds = [layer_config.layer_signature(layer) for layer in layers]
    assert len(set(kinds)) > 1, "the pattern should make the layers differ"
    for count in (1, 2, 3):
        for removed in itertools.combinations(range(4), count):
            keep = [i for i in range(4) if i not in removed]
            trimmed = layer_config.trimmed(config, keep)
            assert layer_config.layer_mismatches([layers[i] for i in keep], trimmed) == [], removed
            # ... and the trimmed config survives a save/load round trip unchanged.
            again = AutoConfig.for_model(**trimmed.to_dict())
            assert layer_config.layer_mismatches([layers[i] for i in keep], again) == [], removed


def test_the_check_fails_when_an_entry_is_left_stale() -> None:
    """The check can fail: a config whose pattern entries were not re-written describes other layers."""
    config = _patterned("deepseek_v3")  # layers 0-1 dense, 2-3 MoE
    layers = list(get_adapter(meta_model(config)).get_layers(meta_model(config)))
    stale = layer_config.trimmed(config, [1, 2, 3])
    assert stale.first_k_dense_replace == 1
    stale.first_k_dense_replace = 2  # as if not re-written: new layer 1 (the MoE layer 2) would be built dense
    assert layer_config.layer_mismatches(layers[1:], stale)
    qwen = _patterned("qwen2_moe")  # layer 1 sparse, 0, 2, 3 dense
    layers = list(get_adapter(meta_model(qwen)).get_layers(meta_model(qwen)))
    trimmed = layer_config.trimmed(qwen, [0, 2, 3])
    assert (trimmed.decoder_sparse_step, trimmed.mlp_only_layers) == (1, [0, 1, 2])  # the period written out
    assert layer_config.layer_mismatches([layers[i] for i in (0, 2, 3)], trimmed) == []
    by_period = AutoConfig.for_model(**{**qwen.to_dict(), "num_hidden_layers": 3, "layer_types": None})  # the period left as it was
    assert layer_config.layer_mismatches([layers[i] for i in (0, 2, 3)], by_period)


def test_unknown_per_layer_lists_are_trimmed_by_name() -> None:
    """Lists with one entry per layer named after layers or heads (e.g. per-layer head counts) follow the kept layers;
    other lists of that length (token ids) are left alone."""
    config = tiny_config("llama")
    config.num_kv_heads_per_layer = [1, 2, 4, 8]
    config.sliding_window_layers = ["a", "b", "c", "d"]
    config.suppress_tokens = [5, 6, 7, 8]
    layer_config.trim(config, [1, 3])
    assert config.num_kv_heads_per_layer == [2, 8] and config.sliding_window_layers == ["b", "d"]
    assert config.suppress_tokens == [5, 6, 7, 8] and config.num_hidden_layers == 2


def test_trim_rejects_unordered_selections() -> None:
    with pytest.raises(layer_config.LayerConfigError, match="ascending"):
        layer_config.trim(tiny_config("llama"), [2, 1])


# Discovered adapters ---------------------------------------------------------------------------------
def test_discovered_adapters_name_the_model_parts() -> None:
    gpt2 = get_adapter(tiny_model("gpt2"))
    assert (gpt2.layers, gpt2.final_norm, gpt2.embed, gpt2.attention, gpt2.mlp) == ("transformer.h", "transformer.ln_f", "transformer.wte", "attn", "mlp")
    assert gpt2.norms == ("ln_1", "ln_2") and "attn.c_attn" in gpt2.linears and "mlp.c_proj" in gpt2.linears
    cohere = get_adapter(tiny_model("cohere"))
    assert (cohere.layers, cohere.final_norm, cohere.norms) == ("model.layers", "model.norm", ("input_layernorm",))
    assert get_adapter(tiny_config("gpt2")) == gpt2  # from the config alone (a meta model), the same names


class _Config:
    model_type = "toy"
    num_hidden_layers = 2


class _NoLayers(nn.Module):
    config = _Config()

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


class _NoFinalNorm(_NoLayers):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])


def test_discovery_names_what_it_cannot_find() -> None:
    with pytest.raises(UnsupportedArchitectureError, match=r"no decoder-layer list \(an nn.ModuleList of num_hidden_layers=2"):
        discover_adapter(_NoLayers())
    with pytest.raises(UnsupportedArchitectureError, match="found no final norm"):
        discover_adapter(_NoFinalNorm())
    with pytest.raises(UnsupportedArchitectureError, match="not a causal LM"):
        get_adapter({"model_type": "t5", "num_layers": 2})
    with pytest.raises(UnsupportedArchitectureError, match="LayerAdapter"):
        get_adapter("bert")


@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere", "llama"])
def test_logits_head_applies_the_familys_scaling(family: str) -> None:
    model = tiny_model(family)
    head = logits_head(model)
    assert isinstance(head, LogitsHead) == (family != "llama")
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(head(out.hidden_states[-1]), out.logits, rtol=1e-6, atol=1e-6)
