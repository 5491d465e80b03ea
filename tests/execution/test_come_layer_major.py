"""CoMe and CoMe-P under hardware=sequential: the same plan, the same choices and the same tensors as resident.

Resident: the whole model edited in place. Layer-major: the model never built; channel statistics streamed per
layer (:mod:`layerfold.execution.concat`), the merges recorded in the plan and rebuilt from the window's layers.
Models: stories260K (a Llama with grouped-query attention, 8 query heads over 4 key-value heads) through its
checkpoint (the compressed checkpoint written layer by layer must equal the resident one), and tiny random
Llama (GQA), Qwen3 (per-head q/k norms) and Mistral (GQA) through an in-memory layer loader.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_checkpoint, tiny_model
from execution_fixtures import _single_thread, story_blocks  # noqa: F401  (fixtures; stories comes from conftest)

from layerfold.execution import ModelLayerLoader, PlannedLayerLoader, SafetensorsLayerLoader, save_layerwise
from layerfold.execution.concat import channel_statistics
from layerfold.execution.trials import LayerMajorStack
from layerfold.capture.channels import capture_channel_statistics
from layerfold.execution import WeightedLayerPlan
from layerfold.methods import MethodContext, compress
from layerfold.models import load_checkpoint, save_checkpoint

STAT_TOL = dict(rel=1e-6, abs=1e-9)
METHODS = {
    "come": {"name": "come", "target_layers": 3, "num_remove": None},
    "come_p": {"name": "come_p", "target_layers": 3, "num_remove": None, "granularity": 4},
    "come_repeat": {"name": "come", "target_layers": 2, "num_remove": None, "wo_repeat": False},  # merges a merged layer again
}


def sequential(activations: str = "device") -> dict:
    return {"mode": "sequential", "activations": activations, "logits_chunk": 13}


def compare_details(ours: dict, resident: dict) -> None:
    """The same windows, ratios, kept heads and channels at every step; scores equal to float rounding."""
    assert {k: v for k, v in ours.items() if k != "details"} == {k: v for k, v in resident.items() if k != "details"}
    for mine, theirs in zip(ours["details"]["steps"], resident["details"]["steps"], strict=True):
        for key in ("positions", "original_layers", "ratio", "kv_heads_kept", "query_heads_kept", "channels_kept"):
            assert mine[key] == theirs[key], key
        assert mine["block_influence"] == pytest.approx(theirs["block_influence"], **STAT_TOL)
        assert [s for s in mine["skip_score"] if s is not None] == pytest.approx([s for s in theirs["skip_score"] if s is not None], **STAT_TOL)
        for a, b in zip(mine.get("trials", []), theirs.get("trials", []), strict=True):
            assert a["ratio"] == b["ratio"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert ours["details"]["merge_info"] == resident["details"]["merge_info"]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("activations", ["device", "host"])
def test_stories_same_plan_and_checkpoint(stories, story_blocks, tmp_path, method, activations):
    path, _, tokenizer = stories
    model, _ = load_checkpoint(path, "cpu", torch.float32)
    resident = compress(MethodContext(model, tokenizer, story_blocks, batch_size=2), METHODS[method])
    loader = SafetensorsLayerLoader(path)
    ctx = MethodContext.layer_major(loader, tokenizer, story_blocks, sequential(activations), "cpu", torch.float32, batch_size=2)
    ours = compress(ctx, METHODS[method])
    compare_details(ours, resident)
    assert any("concat" in layer for layer in ours["layers"])
    save_checkpoint(model, tokenizer, tmp_path / "resident", dtype=torch.bfloat16)
    save_layerwise(PlannedLayerLoader(loader, ctx.plan), tokenizer, tmp_path / "ours", torch.float32, torch.bfloat16)
    # the plan.json the stage writes beside each is `compress`'s output, compared above
    for folder in ("resident", "ours"):
        (tmp_path / folder / "generation_config.json").unlink(missing_ok=True)
    assert_same_checkpoint(tmp_path / "resident", tmp_path / "ours")


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("method", ["come", "come_p"])
def test_tiny_families_same_plan_and_tensors(family, method):
    """Every tensor of every compressed layer, built by the plan layer by layer, equals the resident model's bit for bit."""
    torch.manual_seed(0)
    original = tiny_model(family)
    blocks = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    resident_model = copy.deepcopy(original)
    cfg = {**METHODS[method], "target_layers": 2}
    resident = compress(MethodContext(resident_model, None, blocks, batch_size=2), cfg)
    loader = ModelLayerLoader(original)
    ctx = MethodContext.layer_major(loader, None, blocks, sequential(), "cpu", torch.float32, batch_size=2)
    ours = compress(ctx, cfg)
    compare_details(ours, resident)
    planned = PlannedLayerLoader(loader, ctx.plan)
    layers = resident_model.model.layers
    assert planned.num_layers == len(layers) == 2
    for k, layer in enumerate(layers):
        state, expected = planned.load_layer(k, "cpu", torch.float32), layer.state_dict()
        assert state.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(state[key], tensor), (k, key)


def test_channel_statistics_streamed_per_layer_match_the_resident_hooks(stories, story_blocks):
    """Every running sum of one pass: the FFN and attention channel sums, Block Influence and the skip score (all tokens)."""
    path, model, _ = stories
    resident = capture_channel_statistics(model, story_blocks, 2, window=3, skip_tokens="all", desc=None)
    stack = LayerMajorStack(SafetensorsLayerLoader(path), sequential("host"), "cpu", torch.float32, batch_size=2)
    plan = WeightedLayerPlan(5)
    ours = channel_statistics(stack.stack(plan), stack._embed(story_blocks), 3, "all")
    assert (ours.tokens, ours.sequences) == (resident.tokens, resident.sequences) == (160, 5)
    assert ours.skip_sum.shape == resident.skip_sum.shape == (3,)
    torch.testing.assert_close(ours.bi_sum, resident.bi_sum, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.skip_sum, resident.skip_sum, rtol=1e-6, atol=1e-9)
    for mine, theirs in zip(ours.ffn_abs_sum + ours.attn_abs_sum, resident.ffn_abs_sum + resident.attn_abs_sum, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-9)
    assert stack.report.layers_run == 5  # one pass over the stack
