"""A plan applied per layer equals layerfold.surgery applied to the resident model; BI -> remove + merge -> perplexity."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from execution_fixtures import STORY, _single_thread, story_blocks  # noqa: F401  (fixtures; stories comes from conftest)

from layerfold.capture import BoundaryStatistics
from layerfold.evaluation.perplexity import perplexity as resident_perplexity
from layerfold.evaluation.perplexity_layerwise import perplexity
from layerfold.execution import (
    ModelLayerLoader,
    PlanError,
    PlannedLayerLoader,
    SafetensorsLayerLoader,
    WeightedLayerPlan,
    capture_statistics,
    coefficients_of,
    token_nll,
)
from layerfold.execution.loss import token_nll as resident_token_nll
from layerfold.models import load_checkpoint
from layerfold.scoring.similarity import block_influence, lowest
from layerfold.surgery import LayerPlan, merge_weights, rdsc_code, rdsc_paper, remove_layers, weighted

SEQUENTIAL = {"mode": "sequential", "activations": "device", "prefetch": True}


def test_coefficients_of_the_shipped_merge_rules():
    assert coefficients_of(weighted(0.3), 1) == pytest.approx([0.3, 0.7])
    assert coefficients_of(rdsc_paper, 2) == pytest.approx([-1.0, 1.0, 1.0])  # theta_l + sum (theta_k - theta_l)
    assert coefficients_of(rdsc_code, 2) == pytest.approx([0.0, 0.0, 1.0])  # the released code telescopes to the last layer
    with pytest.raises(PlanError, match="not a weighted sum"):
        coefficients_of(lambda base, others: base * others[0], 1)


def test_weighted_plan_composes_merges_and_keeps_the_plan_json_layout():
    plan, groups_only = WeightedLayerPlan(6), LayerPlan(6)
    for p in (plan, groups_only):
        p.remove([5])
    plan.merge(1, [2], weighted(0.25))  # layer 1 = 0.25 th1 + 0.75 th2
    groups_only.merge(1, [2])
    plan.merge(0, [1], weighted(0.5))  # layer 0 = 0.5 th0 + 0.125 th1 + 0.375 th2
    groups_only.merge(0, [1])
    written = plan.to_json()
    expected = groups_only.to_json()
    assert {k: v for k, v in written.items() if k != "layers"} == {k: v for k, v in expected.items() if k != "layers"}
    assert [e["stands_for"] for e in written["layers"]] == [e["stands_for"] for e in expected["layers"]] == [[0, 1, 2], [3], [4]]
    assert written["layers"][0]["coefficients"] == pytest.approx([0.5, 0.125, 0.375])
    assert written["layers"][0]["base"] == 0 and written["layers"][2]["coefficients"] == [1.0]
    plan.merge(1, [2])  # grouping only: the weights of the result are unknown, and stay so through later merges
    plan.merge(0, [1], weighted(0.5))
    assert "coefficients" not in plan.to_json()["layers"][0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_planned_loader_equals_surgery_on_the_resident_model(family):
    original, edited = tiny_model(family), tiny_model(family)
    plan = WeightedLayerPlan(4)
    # What ShortGPT then MKA do through MethodContext: remove layer 3, then merge layer 1 into layer 0.
    remove_layers(edited, [3])
    plan.remove([3])
    merge_weights(edited, 0, [1], weighted(0.3))
    remove_layers(edited, [1])
    plan.merge(0, [1], weighted(0.3))

    planned = PlannedLayerLoader(ModelLayerLoader(original), plan)
    assert planned.num_layers == 2 and planned.config.num_hidden_layers == 2
    assert getattr(planned.config, "layer_types", None) == getattr(edited.config, "layer_types", None)
    for k, layer in enumerate(edited.model.layers):
        state = planned.load_layer(k, "cpu", torch.float32)
        assert state.keys() == layer.state_dict().keys()
        for key, tensor in layer.state_dict().items():
            torch.testing.assert_close(state[key], tensor, rtol=1e-6, atol=1e-7)
    blocks = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(4))
    nll, count, _ = token_nll(planned, blocks, SEQUENTIAL, batch_size=2)
    reference, reference_count = resident_token_nll(edited, blocks)
    assert count == reference_count and nll == pytest.approx(reference, rel=1e-5)
    # The same plan through plan.json, and resident execution of the planned loader.
    resident_nll, _, _ = token_nll(PlannedLayerLoader(ModelLayerLoader(original), plan.to_json()), blocks, {"mode": "resident"})
    assert resident_nll == pytest.approx(reference, rel=1e-5)


def test_plan_json_without_merge_coefficients_is_refused():
    groups_only = LayerPlan(4)
    groups_only.remove([1])
    loader = ModelLayerLoader(tiny_model("llama"))
    assert PlannedLayerLoader(loader, groups_only.to_json()).num_layers == 3  # removals need nothing more
    groups_only.merge(0, [1])
    with pytest.raises(PlanError, match="plan layer 0 merges original layers \\[0, 2\\] but records no merge coefficients"):
        PlannedLayerLoader(loader, groups_only.to_json())
    with pytest.raises(PlanError, match="6 original layers but the loaded model has 4"):
        PlannedLayerLoader(loader, LayerPlan(6).to_json())


def test_block_influence_removal_and_merge_on_stories260k(stories, story_blocks):
    """Capture -> Block Influence -> remove the lowest-BI layer, merge the next-lowest pair -> perplexity, layer by layer."""
    path, _, tokenizer = stories
    stats = BoundaryStatistics(6, max_distance=1)
    capture_statistics(path, story_blocks, SEQUENTIAL, stats, batch_size=2)
    bi = block_influence(stats.cosine)
    assert torch.isfinite(bi).all() and bi.shape == (5,)
    removed = lowest(bi, 1)[0]
    merged = min((l for l in range(4) if removed not in (l, l + 1)), key=lambda l: float(bi[l] + bi[l + 1]))

    plan = WeightedLayerPlan(5)
    plan.remove([removed])
    position = plan.groups.index([merged])
    plan.merge(position, [position + 1], weighted(0.6))
    planned = PlannedLayerLoader(SafetensorsLayerLoader(path), plan)
    ours = perplexity(planned, tokenizer, STORY * 2, 32, SEQUENTIAL, max_windows=6, add_bos=True, batch_size=3)

    model, _ = load_checkpoint(path)  # the same edits through layerfold.surgery, on the resident model
    remove_layers(model, [removed])
    merge_weights(model, position, [position + 1], weighted(0.6))
    remove_layers(model, [position + 1])
    reference = resident_perplexity(model, tokenizer, STORY * 2, 32, max_windows=6, add_bos=True, desc=None)
    assert ours["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    assert ours["tokens_scored"] == reference["tokens_scored"] and ours["execution"]["layers_run"] == 3
