"""Weight merges across families: every tensor but the norms, experts expert by expert with their router,
dense and mixture-of-experts layers never mixed, and the layer-by-layer plan builds the same merged layer."""

from __future__ import annotations

import pytest
import torch

from layerfold.execution import ModelLayerLoader, PlannedLayerLoader, WeightedLayerPlan
from layerfold.methods import MethodContext, compress
from layerfold.models.adapters import get_adapter
from layerfold.models.tiny import MOE_FAMILIES, TINY_FAMILIES, tiny_model, tiny_tokenizer
from layerfold.surgery import LayerSurgeryError, merge_weights, mergeable, rdsc_paper, weighted


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models only (see conftest.one_thread)."""


def _states(model, positions):
    layers = get_adapter(model).get_layers(model)
    return [{k: v.clone() for k, v in layers[p].state_dict().items()} for p in positions]


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_alpha_merge_combines_everything_but_the_norms(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    base, other = _states(model, [2, 3])
    written = merge_weights(model, 2, [3], weighted(0.3))
    merged = adapter.get_layers(model)[2].state_dict()
    assert set(written) == set(adapter.merged_keys(merged)) and written
    for key, value in merged.items():
        if adapter.is_norm_key(key):
            assert torch.equal(value, base[key]), key  # the base layer's norms
        elif value.is_floating_point():
            torch.testing.assert_close(value, 0.3 * base[key] + 0.7 * other[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_merge_expert_by_expert_with_their_router(family: str) -> None:
    """Expert e of the merged layer is the combination of expert e of both layers, and so is row e of the router
    (the logit that sends a token to expert e): LaCo's RDSC and MKA's alpha both act on them like on any weight."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    a, b, c = _states(model, [1, 2, 3])
    merge_weights(model, 1, [2, 3], rdsc_paper)
    layer = adapter.get_layers(model)[1]
    experts = dict(layer.get_submodule(adapter.experts).named_parameters())
    assert experts and all(p.dim() == 3 for p in experts.values())
    for name, tensor in experts.items():
        key = f"{adapter.experts}.{name}"
        for e in range(tensor.shape[0]):
            expected = a[key][e] + (b[key][e] - a[key][e]) + (c[key][e] - a[key][e])
            torch.testing.assert_close(tensor[e], expected, rtol=1e-5, atol=1e-6)
    router = {k: v for k, v in layer.state_dict().items() if k.startswith(adapter.router + ".")}
    assert router
    for key, value in router.items():  # weight, and DeepSeek-V3's score-correction bias buffer
        torch.testing.assert_close(value, a[key] + (b[key] - a[key]) + (c[key] - a[key]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_dense_and_moe_layers_are_never_merged(family: str) -> None:
    model = tiny_model(family)  # layer 0 dense (first_k_dense_replace=1 / mlp_only_layers=[0]), 1-3 MoE
    assert not mergeable(model, [0, 1]) and mergeable(model, [1, 2, 3])
    before = _states(model, [0])[0]
    with pytest.raises(LayerSurgeryError, match="differ in structure"):
        merge_weights(model, 0, [1], weighted(0.5))
    assert all(torch.equal(v, before[k]) for k, v in get_adapter(model).get_layers(model)[0].state_dict().items())


def test_laco_and_mka_only_merge_layers_of_one_kind() -> None:
    """LaCo skips the window over the dense/MoE boundary; MKA only picks pairs of one kind."""
    blocks = torch.randint(4, 99, (8, 10), generator=torch.Generator().manual_seed(0))
    model = tiny_model("deepseek_v3")
    plan = compress(MethodContext(model, tiny_tokenizer(), blocks, batch_size=4),
                    {"name": "laco", "merge_layers": 2, "threshold": -1.0, "interval": 1, "lowest_layer": 0})
    assert [s["base"] for s in plan["details"]["skipped_windows"]] == [0]
    assert all(0 not in t["original_layers"] or t["original_layers"] == [0] for t in plan["details"]["trials"])
    assert [0] in [layer["stands_for"] for layer in plan["layers"]] and plan["merged"]
    model = tiny_model("deepseek_v3")
    plan = compress(MethodContext(model, None, blocks, batch_size=4), {"name": "mka", "num_remove": 2, "k_entropy": 3, "n_neighbors": 3})
    assert [layer["stands_for"] for layer in plan["layers"]] == [[0], [1, 2, 3]]
    assert get_adapter(model).num_layers(model) == 2 and model.config.first_k_dense_replace == 1


@pytest.mark.parametrize("family", MOE_FAMILIES + ("phi3", "gemma2"))
def test_planned_layer_equals_the_resident_merge(family: str) -> None:
    """Layer by layer, a merged layer is built from the originals with the resident merge's arithmetic, bit for bit,
    and the planned config describes the merged stack (dense prefix, MoE layer lists)."""
    model = tiny_model(family)
    plan = WeightedLayerPlan(4)
    plan.merge(2, [3], weighted(0.25))
    plan.remove([0])
    planned = PlannedLayerLoader(ModelLayerLoader(tiny_model(family)), plan)  # the same weights, never edited
    merge_weights(model, 2, [3], weighted(0.25))
    from layerfold.surgery import remove_layers

    remove_layers(model, [3, 0])
    layers = get_adapter(model).get_layers(model)
    for k in range(planned.num_layers):
        ours = planned.load_layer(k, "cpu", torch.float32)
        theirs = layers[k].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), k
    config = planned.config
    for key in ("num_hidden_layers", "first_k_dense_replace", "mlp_only_layers", "moe_layers", "layer_types", "no_rope_layers"):
        assert getattr(config, key, None) == getattr(model.config, key, None), key
