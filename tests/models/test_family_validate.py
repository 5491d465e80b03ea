"""validate decides family support from the config alone (a meta model, no weights) and names the reason."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from conftest import REPO
from layerfold.config import ConfigError, compose
from layerfold.models.adapters import UnsupportedArchitectureError
from layerfold.models.facts import ModelFacts, facts_from_config
from layerfold.models.tiny import tiny_config
from layerfold.methods import family_refusal
from layerfold.surgery.support import family_of
from layerfold.validation import check


def params(*overrides: str):
    from omegaconf import OmegaConf

    return OmegaConf.create(compose(REPO / "conf", list(overrides)))


def facts(family: str, **changes) -> ModelFacts:
    config = tiny_config(family).to_dict()
    return facts_from_config(AutoConfig.for_model(**{**config, **changes}))


def test_facts_carry_the_config_but_record_only_the_facts() -> None:
    fact = facts("deepseek_v3")
    assert fact.config["first_k_dense_replace"] == 1
    assert fact.to_json() == {"model_type": "deepseek_v3", "num_layers": 4, "context_length": 2048, "vocab_size": 128}


@pytest.mark.parametrize("family, overrides, message", [
    ("mixtral", ["method=come", "method.num_remove=1"], "routes its FFN through a mixture of experts"),
    ("qwen3_moe", ["method=come_p", "method.num_remove=1"], "one layer's router cannot route tokens to the experts of two layers"),
    ("deepseek_v2", ["method=come", "method.num_remove=1"], "multi-head latent attention"),
    ("gemma2", ["method=streamline", "method.num_remove=1", "method.replacement=swiglu"], "its FFN is gelu_pytorch_tanh-gated"),
    ("qwen2_moe", ["method=streamline", "method.num_remove=1", "method.replacement=swiglu"], "its FFN is a mixture of experts"),
    ("llama4_text", ["method=streamline", "method.num_remove=1", "method.replacement=mlp"], r"\(output, router scores\) pair"),
    ("gpt2", ["method=streamline", "method.num_remove=1", "method.replacement=ffn"], "no curated adapter|has none"),
    ("cohere", ["method=come", "method.num_remove=1"], "no curated adapter"),
])
def test_refusals_name_the_reason(family: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        check(params(*overrides), facts(family))
    assert f"[model family: {family}]" in str(error.value)


def test_merges_of_mixed_stacks_are_refused_only_when_impossible() -> None:
    interleaved = facts("llama4_text", moe_layers=[1, 3])  # dense, MoE, dense, MoE: no pair of one kind
    with pytest.raises(ConfigError, match=r"allows at most 0 such merges \(layers 0,2 alike; layers 1,3 alike\)"):
        check(params("method=mka", "method.num_remove=1"), interleaved)
    with pytest.raises(ConfigError, match="no two adjacent layers between lowest_layer=0 and highest_layer=3"):
        check(params("method=laco", "method.target_layers=3"), interleaved)
    dense_first = facts("deepseek_v3", first_k_dense_replace=2)  # two merges possible: (0, 1) and (2, 3)
    check(params("method=mka", "method.num_remove=2"), dense_first)
    with pytest.raises(ConfigError, match="at most 2 such merges .* method.num_remove=3"):
        check(params("method=mka", "method.num_remove=3"), dense_first)
    with pytest.raises(ConfigError, match="lowest_layer=1 and highest_layer=2"):
        check(params("method=laco", "method.lowest_layer=1", "method.highest_layer=2", "method.target_layers=3"), dense_first)
    check(params("method=laco", "method.lowest_layer=2", "method.target_layers=3"), dense_first)
    check(params("method=mka", "method.num_remove=1", "method.apply_merge=false"), interleaved)  # only deletes


def test_removal_of_a_discovered_family_is_refused_when_its_config_cannot_follow() -> None:
    """GPT-2 scaling attention by 1 / (layer index + 1): a layer moved to another index would get another scale."""
    stock = facts("gpt2")
    check(params("method=shortgpt", "method.num_remove=1"), stock)
    scaled = facts("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ConfigError, match=r"not all built alike.*settings differ.*scaling"):
        check(params("method=shortgpt", "method.num_remove=1"), scaled)


def test_unknown_architectures_are_refused_before_anything_loads() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="not a causal LM"):
        check(params("method=shortgpt"), ModelFacts("t5", 4, 512, 128, config={"model_type": "t5", "num_layers": 4}))
    with pytest.raises(UnsupportedArchitectureError, match="Architecture 'mystery' is not supported"):
        check(params("method=shortgpt"), ModelFacts("mystery", 4, 512, 128))  # a GGUF header: no config to build


def test_without_a_config_the_family_decides_alone() -> None:
    """A GGUF header gives no config: a MoE family is taken to route every layer."""
    family = family_of("qwen2_moe", None)
    assert "mixture of experts" in family_refusal(family, {"name": "come"})
    assert family_refusal(family, {"name": "mka", "num_remove": 3}) is None
    assert family_refusal(family_of("llama", None), {"name": "come"}) is None
