"""CoMe's concatenation merge on the families added beside Llama: fused projections split block by block (Phi-3),
whole-projection q/k norms (OLMo 2), sandwich norms and per-head norms (Gemma 2/3), and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from layerfold.models.adapters import UnsupportedArchitectureError, get_adapter
from layerfold.models.tiny import MOE_FAMILIES, tiny_model
from layerfold.scoring.channels import choose_pieces
from layerfold.surgery.concat import ConcatChoice, concat_layout, concat_merge_state

CONCAT_FAMILIES = ["gemma2", "gemma3_text", "phi3", "olmo2", "smollm3", "granite"]


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models only (see conftest.one_thread)."""


def merged_layer(model, positions: list[int], choice: ConcatChoice, norms: str = "mean") -> torch.nn.Module:
    state = concat_merge_state(model, concat_layout(model), positions, choice, norms)
    layer = copy.deepcopy(get_adapter(model).get_layers(model)[positions[0]])  # one layer, in a test only
    layer.load_state_dict(state, strict=True)
    return layer


def scores(layout, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return ([torch.rand(layout.num_kv_heads, generator=gen) for _ in range(2)],
            [torch.rand(layout.intermediate, generator=gen) for _ in range(2)])


@pytest.mark.parametrize("family", CONCAT_FAMILIES)
def test_ratio_one_zero_reproduces_the_first_layer(family: str) -> None:
    model = tiny_model(family)
    layout = concat_layout(model)
    first = {k: v.clone() for k, v in get_adapter(model).get_layers(model)[1].state_dict().items()}
    choice = choose_pieces(layout, [1.0, 0.0], *scores(layout, 0))
    weighted = merged_layer(model, [1, 2], choice, norms="weighted").state_dict()
    assert weighted.keys() == first.keys()
    for name, value in first.items():
        assert torch.equal(weighted[name], value), name


def _position_embeddings(model, layer, x: torch.Tensor):
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    rotary = model.model.rotary_emb
    if model.config.model_type == "gemma3_text":  # one table per attention type
        return rotary(x, positions, model.config.layer_types[layer.self_attn.layer_idx])
    return rotary(x, positions)


def attend(model, layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's attention on ``x`` (no norm, no residual, no mask), with its own rotary table."""
    return layer.self_attn(hidden_states=x, position_embeddings=_position_embeddings(model, layer, x), attention_mask=None)[0]


def masked_input(module: torch.nn.Module, keep: torch.Tensor):
    return module.register_forward_pre_hook(lambda mod, args: (args[0] * keep,))


@pytest.mark.parametrize("family, positions", [("phi3", [1, 2]), ("gemma2", [1, 2]), ("granite", [1, 2]), ("smollm3", [0, 2])])
def test_merged_attention_and_ffn_are_the_sum_of_the_kept_pieces(family: str, positions: list[int]) -> None:
    """Each kept head attends with its own key-value head and each kept channel reads the same input as in its layer:
    for Phi-3 this holds only if the fused qkv_proj and gate_up_proj rows were split block by block.

    Exact only where the merged layer computes each piece as its own layer did: not across a rope and a no-rope
    SmolLM3 layer (the merged layer keeps the first one's setting, so two rope layers here), and not for per-head
    q/k norms (Gemma 3, Qwen3), which the merge shares between the layers' heads (ratio-weighted)."""
    model = tiny_model(family)
    layers = get_adapter(model).get_layers(model)
    layout = concat_layout(model)
    choice = choose_pieces(layout, [0.5, 0.5], *scores(layout, 3))
    assert all(choice.kv_heads) and all(choice.channels)
    merged = merged_layer(model, positions, choice)
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        attn_expected, ffn_expected = torch.zeros_like(x), torch.zeros_like(x)
        for k, layer in enumerate(layers[p] for p in positions):
            o_proj, down = layer.get_submodule(layout.attn_output), layer.get_submodule(layout.mlp_output)
            keep = torch.zeros(o_proj.in_features)
            for h in choice.query_heads[k]:
                keep[h * layout.head_dim : (h + 1) * layout.head_dim] = 1
            with masked_input(o_proj, keep):
                attn_expected += attend(model, layer, x)
            keep = torch.zeros(down.in_features)
            keep[choice.channels[k]] = 1
            with masked_input(down, keep):
                ffn_expected += layer.mlp(x)
        torch.testing.assert_close(attend(model, merged, x), attn_expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.mlp(x), ffn_expected, atol=1e-5, rtol=1e-5)


def test_fused_rows_are_split_block_by_block() -> None:
    model = tiny_model("phi3")
    layout = concat_layout(model)
    assert layout.rows == (("self_attn.qkv_proj", ("query", "key", "value")), ("mlp.gate_up_proj", ("gate", "up")))
    choice = ConcatChoice(ratio=[0.5, 0.5], kv_heads=[[1], [0]], query_heads=[[2, 3], [0, 1]], channels=[[0, 5], [7]])
    state = concat_merge_state(model, layout, [1, 2], choice)
    a, b = (get_adapter(model).get_layers(model)[i] for i in (1, 2))
    d, q, kv, inter = layout.head_dim, layout.num_heads * layout.head_dim, layout.num_kv_heads * layout.head_dim, layout.intermediate

    def rows(layer, offset, heads):
        return layer.self_attn.qkv_proj.weight[[offset + h * d + i for h in heads for i in range(d)]]

    expected = torch.cat([rows(a, 0, [2, 3]), rows(b, 0, [0, 1]), rows(a, q, [1]), rows(b, q, [0]), rows(a, q + kv, [1]), rows(b, q + kv, [0])])
    assert torch.equal(state["self_attn.qkv_proj.weight"], expected)
    gate_up = torch.cat([a.mlp.gate_up_proj.weight[[0, 5]], b.mlp.gate_up_proj.weight[[7]],
                         a.mlp.gate_up_proj.weight[[inter, inter + 5]], b.mlp.gate_up_proj.weight[[inter + 7]]])
    assert torch.equal(state["mlp.gate_up_proj.weight"], gate_up)


def test_whole_projection_norms_follow_the_heads_rows() -> None:
    """OLMo 2 normalises q and k over the whole projection, so their weights are per row: they follow the kept heads."""
    model = tiny_model("olmo2")
    layout = concat_layout(model)
    assert ("self_attn.q_norm", ("query",)) in layout.rows and "self_attn.q_norm" not in layout.norms
    choice = ConcatChoice(ratio=[0.5, 0.5], kv_heads=[[0], [1]], query_heads=[[0, 1], [2, 3]], channels=[[0], [1]])
    state = concat_merge_state(model, layout, [0, 3], choice)
    a, b = (get_adapter(model).get_layers(model)[i] for i in (0, 3))
    d = layout.head_dim
    assert torch.equal(state["self_attn.q_norm.weight"], torch.cat([a.self_attn.q_norm.weight[: 2 * d], b.self_attn.q_norm.weight[2 * d :]]))
    assert torch.equal(state["self_attn.k_norm.weight"], torch.cat([a.self_attn.k_norm.weight[:d], b.self_attn.k_norm.weight[d:]]))
    assert torch.equal(state["post_feedforward_layernorm.weight"], (a.post_feedforward_layernorm.weight + b.post_feedforward_layernorm.weight) / 2)


@pytest.mark.parametrize("family, message", [
    *[(f, "mixture of experts") for f in MOE_FAMILIES if not f.startswith("deepseek")],
    ("deepseek_v2", "latent attention"), ("deepseek_v3", "latent attention"),
    ("gpt2", "no curated adapter"), ("cohere", "no curated adapter"),
])
def test_refused_families_name_the_reason(family: str, message: str) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=message):
        concat_layout(tiny_model(family))
