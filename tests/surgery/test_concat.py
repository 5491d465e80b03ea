"""CoMe's concatenation merge on tiny random models: exact reproduction, head/channel contributions, GQA pairing."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from layerfold.models.adapters import UnsupportedArchitectureError, get_adapter
from layerfold.scoring.channels import choose_pieces
from layerfold.surgery.concat import ConcatChoice, concat_layout, concat_merge_state, query_heads

MERGEABLE = ["llama", "mistral", "qwen2", "qwen3", "opt"]


def randomised(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model whose norms and biases differ per layer too (default init makes norms all ones)."""
    model = tiny_model(family, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model


def random_scores(layout, layers: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return (
        [torch.rand(layout.num_kv_heads, generator=gen) for _ in range(layers)],
        [torch.rand(layout.intermediate, generator=gen) for _ in range(layers)],
    )


def merged_layer(model, positions: list[int], choice: ConcatChoice, norms: str = "mean") -> torch.nn.Module:
    layout = concat_layout(model)
    state = concat_merge_state(model, layout, positions, choice, norms)
    layer = copy.deepcopy(get_adapter(model).get_layers(model)[positions[0]])  # one layer, in a test only
    layer.load_state_dict(state, strict=True)
    return layer


def attend(model, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's attention on ``x`` (no norm, no residual), causal, with the model's rotary embedding if any."""
    if model.config.model_type == "opt":
        return layer.self_attn(hidden_states=x, attention_mask=None)[0]
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    return layer.self_attn(hidden_states=x, position_embeddings=model.model.rotary_emb(x, positions), attention_mask=None)[0]


def feed_forward(model, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if model.config.model_type == "opt":
        return layer.fc2(layer.activation_fn(layer.fc1(x)))
    return layer.mlp(x)


def masked_input(module: torch.nn.Module, keep: torch.Tensor):
    """Zero the input channels of ``module`` outside ``keep``: the output is then the kept pieces' contribution plus the bias."""
    return module.register_forward_pre_hook(lambda mod, args: (args[0] * keep,))


# Reproduction ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MERGEABLE)
def test_ratio_one_zero_reproduces_the_first_layer(family: str) -> None:
    model = randomised(family)
    layout = concat_layout(model)
    heads, channels = random_scores(layout, 2)
    first = {k: v.clone() for k, v in get_adapter(model).get_layers(model)[1].state_dict().items()}
    choice = choose_pieces(layout, [1.0, 0.0], heads, channels)
    assert choice.kv_heads == [list(range(layout.num_kv_heads)), []]
    assert [len(c) for c in choice.channels] == [layout.intermediate, 0]

    weighted = merged_layer(model, [1, 2], choice, norms="weighted").state_dict()
    assert weighted.keys() == first.keys()
    for name, value in first.items():
        assert torch.equal(weighted[name], value), name

    # The released code's plain mean of the layer norms: everything else is still layer 1's.
    second = get_adapter(model).get_layers(model)[2]
    mean = merged_layer(model, [1, 2], choice, norms="mean").state_dict()
    for name, value in first.items():
        if name.split(".weight")[0].split(".bias")[0] in layout.norms:
            expected = (value + second.state_dict()[name]) / 2
            assert torch.allclose(mean[name], expected), name
        else:
            assert torch.equal(mean[name], value), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_partial_ratio_is_the_sum_of_the_selected_pieces(family: str) -> None:
    model = randomised(family)
    layers = get_adapter(model).get_layers(model)
    layout = concat_layout(model)
    heads, channels = random_scores(layout, 2, seed=3)
    ratio = [0.5, 0.5]  # 2 key-value heads: one from each layer (0.6/0.4 would floor to 0 for the second)
    choice = choose_pieces(layout, ratio, heads, channels, heads="grouped")
    assert all(choice.kv_heads) and all(choice.channels)  # both layers contribute
    merged = merged_layer(model, [1, 2], choice)
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(5))

    with torch.no_grad():
        attn_expected = torch.zeros_like(x)
        ffn_expected = torch.zeros_like(x)
        for k, layer in enumerate(layers[1:3]):
            o_proj = layer.get_submodule(layout.attn_output)
            keep = torch.zeros(o_proj.in_features)
            for h in choice.query_heads[k]:  # each kept query head, attending with its own key-value head
                keep[h * layout.head_dim : (h + 1) * layout.head_dim] = 1
            with masked_input(o_proj, keep):
                attn_expected += attend(model, layer, x)
            down = layer.get_submodule(layout.mlp_output)
            keep = torch.zeros(down.in_features)
            keep[choice.channels[k]] = 1
            with masked_input(down, keep):
                ffn_expected += feed_forward(model, layer, x)
            # Each layer's own output bias came with it; the merge keeps sum_k r_k b_k instead.
            for module, expected in ((o_proj, attn_expected), (down, ffn_expected)):
                if module.bias is not None:
                    expected += (ratio[k] - 1.0) * module.bias
        attn = attend(model, merged, x)
        ffn = feed_forward(model, merged, x)

    torch.testing.assert_close(attn, attn_expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ffn, ffn_expected, atol=1e-5, rtol=1e-5)


# Grouped-query pairing ----------------------------------------------------------------------------


def test_query_heads_grouped_vs_tiled() -> None:
    # 4 query heads over 2 key-value heads (n_rep = 2): kv head 1 owns query heads 2 and 3.
    assert query_heads([1], 4, 2, "grouped") == [2, 3]
    assert query_heads([1], 4, 2, "tiled") == [1, 3]
    assert query_heads([0], 4, 2, "grouped") == [0, 1]
    assert query_heads([0], 4, 2, "tiled") == [0, 2]
    # Multi-head attention (n_rep = 1): both rules are the identity.
    for kept in ([0], [2, 3], [0, 1, 3]):
        assert query_heads(kept, 4, 4, "grouped") == query_heads(kept, 4, 4, "tiled") == kept


def test_tiled_heads_break_the_sum_of_contributions_under_gqa() -> None:
    """The released selection pairs kept query heads with other key-value heads: the merged output is not
    what those heads computed in their own layer."""
    model = randomised("llama")
    layers = model.model.layers
    layout = concat_layout(model)
    assert layout.n_rep == 2
    heads = [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])]  # layer 1 keeps kv head 1, layer 2 kv head 0
    channels = [torch.rand(layout.intermediate) for _ in range(2)]
    tiled = choose_pieces(layout, [0.5, 0.5], heads, channels, heads="tiled")
    grouped = choose_pieces(layout, [0.5, 0.5], heads, channels, heads="grouped")
    assert tiled.kv_heads == grouped.kv_heads == [[1], [0]]
    assert grouped.query_heads == [[2, 3], [0, 1]]
    assert tiled.query_heads == [[1, 3], [0, 2]]

    x = torch.randn(1, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.zeros_like(x)
        for k, layer in enumerate(layers[1:3]):
            keep = torch.zeros(layer.self_attn.o_proj.in_features)
            for h in tiled.query_heads[k]:
                keep[h * layout.head_dim : (h + 1) * layout.head_dim] = 1
            with masked_input(layer.self_attn.o_proj, keep):
                expected += attend(model, layer, x)
        out = attend(model, merged_layer(model, [1, 2], tiled), x)
    assert not torch.allclose(out, expected, atol=1e-3)


# Unsupported layers ---------------------------------------------------------------------------------


def test_fused_attention_is_rejected() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="separate query/key/value"):
        concat_layout(tiny_model("gpt_neox"))


def test_layer_without_mlp_intermediate_is_rejected() -> None:
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = torch.nn.Identity()
    with pytest.raises(UnsupportedArchitectureError, match="MLP intermediate"):
        concat_layout(model)
