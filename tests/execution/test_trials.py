"""The methods' trials run layer-major too: same plans, same losses and similarities, same checkpoint as resident."""

from __future__ import annotations

import dataclasses

import json

import pytest
import torch
from conftest import assert_same_checkpoint, tiny_model
from execution_fixtures import _single_thread, story_blocks  # noqa: F401  (fixtures; stories comes from conftest)

from layerfold.capture import BoundaryStatistics
from layerfold.execution import LayerMajorStack, ModelLayerLoader, SafetensorsLayerLoader, WeightedLayerPlan
from layerfold.methods import LayerMajorUnsupported, MethodContext, check_layer_major, compress
from layerfold.models import load_checkpoint
from layerfold.surgery import rdsc_paper

RESIDENT_TOL = dict(rel=1e-5, abs=1e-6)


def sequential(activations: str, **extra) -> dict:
    return {"mode": "sequential", "activations": activations, "logits_chunk": 13, **extra}


def both_plans(path, tokenizer, blocks, method: dict, activations: str) -> tuple[dict, dict, MethodContext]:
    """``compress`` of the stories checkpoint, resident (a fresh copy, edited in place) and layer-major from its shards."""
    model, _ = load_checkpoint(path, "cpu", torch.float32)
    resident = compress(MethodContext(model, tokenizer, blocks, batch_size=2), method)
    ctx = MethodContext.layer_major(SafetensorsLayerLoader(path), tokenizer, blocks, sequential(activations), "cpu", torch.float32, batch_size=2)
    return resident, compress(ctx, method), ctx


def structure(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if k != "details"}


@pytest.mark.parametrize("activations", ["device", "host"])
def test_sleb_same_blocks_and_losses(stories, story_blocks, activations):
    path, _, tokenizer = stories
    resident, ours, ctx = both_plans(path, tokenizer, story_blocks, {"name": "sleb", "num_remove": 2}, activations)
    assert structure(ours) == structure(resident)
    assert ours["details"]["removal_order"] == resident["details"]["removal_order"]
    assert ours["details"]["dense_loss"] == pytest.approx(resident["details"]["dense_loss"], **RESIDENT_TOL)
    for mine, theirs in zip(ours["details"]["steps"], resident["details"]["steps"]):
        assert [c["position"] for c in mine["candidates"]] == [c["position"] for c in theirs["candidates"]]
        assert [c["loss"] for c in mine["candidates"]] == pytest.approx([c["loss"] for c in theirs["candidates"]], **RESIDENT_TOL)
    assert ctx.stack.report.activations == activations and ctx.num_layers == 3


def test_removal_nll_shares_the_prefix(stories, story_blocks):
    """Candidates 1..3 of 5 layers: layers 0..2 carried once (3 passes), suffixes 3 + 2 + 1, dense 5."""
    path, model, _ = stories
    stack = LayerMajorStack(ModelLayerLoader(model), sequential("device"), "cpu", torch.float32, batch_size=2)
    plan = WeightedLayerPlan(5)
    dense = stack.calibration_nll(plan, story_blocks)
    losses = stack.removal_nll(plan, story_blocks, [3, 1, 2])
    assert stack.report.layers_run == 5 + 3 + (3 + 2 + 1)
    without_two = WeightedLayerPlan(5)
    without_two.remove([2])
    assert losses[2] == pytest.approx(stack.calibration_nll(without_two, story_blocks), rel=1e-6)
    assert sorted(losses) == [1, 2, 3] and all(v > dense for v in losses.values())


@pytest.mark.parametrize("rdsc, merge_layers, threshold", [("paper", 2, 0.85), ("code", 3, 0.7), ("paper", 3, 0.1)])
@pytest.mark.parametrize("activations", ["device", "host"])
def test_laco_same_merges_and_similarities(stories, story_blocks, rdsc, merge_layers, threshold, activations):
    path, _, tokenizer = stories
    method = {"name": "laco", "rdsc": rdsc, "merge_layers": merge_layers, "threshold": threshold, "interval": 1}
    resident, ours, ctx = both_plans(path, tokenizer, story_blocks, method, activations)
    assert structure(ours) == structure(resident)
    trials = [(t["base"], t["folded"], t["accepted"]) for t in ours["details"]["trials"]]
    assert trials == [(t["base"], t["folded"], t["accepted"]) for t in resident["details"]["trials"]]
    assert [t["similarity"] for t in ours["details"]["trials"]] == pytest.approx([t["similarity"] for t in resident["details"]["trials"]], **RESIDENT_TOL)
    assert {accepted for *_, accepted in trials} == {True, False}  # both branches of the search ran


def test_laco_trials_start_at_the_first_changed_layer(stories, story_blocks):
    """After the dense reference (5 layers), a merge at base b re-runs only the layers from b."""
    path, _, tokenizer = stories
    ctx = MethodContext.layer_major(SafetensorsLayerLoader(path), tokenizer, story_blocks, sequential("device"), "cpu", torch.float32)
    inputs = [torch.tensor([1, 5, 9, 3]), torch.tensor([1, 7, 2])]
    ctx.final_representations(inputs)
    assert ctx.stack.report.layers_run == 5
    with ctx.trial(changed=[3]):
        ctx.merge(3, [4], rdsc_paper)
        ctx.final_representations(inputs)
    assert ctx.stack.report.layers_run == 5 + 1 and ctx.num_layers == 5  # the trial was undone
    with ctx.trial(changed=[1]) as trial:
        ctx.merge(1, [2, 3], rdsc_paper)
        merged = ctx.final_representations(inputs)
        trial.accept()
    assert ctx.stack.report.layers_run == 5 + 1 + 2 and ctx.num_layers == 3
    model, _ = load_checkpoint(path, "cpu", torch.float32)
    resident = MethodContext(model, tokenizer, story_blocks)
    resident.merge(1, [2, 3], rdsc_paper)
    for ours, theirs in zip(merged, resident.final_representations(inputs)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [
    {"name": "shortgpt", "num_remove": 2}, {"name": "gromov", "num_remove": 2}, {"name": "drop_last", "num_remove": 2},
    {"name": "streamline", "num_remove": 2, "replacement": "none"},
])
def test_statistics_methods_same_plan(stories, story_blocks, method):
    """No dense statistics given: both contexts capture them (layer-major: layer by layer), then choose the same layers."""
    path, _, tokenizer = stories
    resident, ours, _ = both_plans(path, tokenizer, story_blocks, method, "host")
    assert structure(ours) == structure(resident) and ours["removed"]
    scores = next(k for k in ("block_influence", "block_angular_distance", "window_scores") if k in resident["details"]) if method["name"] != "drop_last" else None
    if scores:
        assert ours["details"][scores] == pytest.approx(resident["details"][scores], **RESIDENT_TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mka_recaptures_and_merges_layer_major(family):
    """MKA re-captures the merged model before every step: the planned stack's statistics, same merges and alphas."""
    blocks = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(3))
    method = {"name": "mka", "num_remove": 2, "recompute": True, "k_entropy": 8}
    resident = compress(MethodContext(tiny_model(family), None, blocks, batch_size=4), method)
    ctx = MethodContext.layer_major(ModelLayerLoader(tiny_model(family)), None, blocks, sequential("host"), "cpu", torch.float32, batch_size=4)
    ours = compress(ctx, method)
    assert [s["pair"] for s in ours["details"]["steps"]] == [s["pair"] for s in resident["details"]["steps"]]
    assert [s["alpha"] for s in ours["details"]["steps"]] == pytest.approx([s["alpha"] for s in resident["details"]["steps"]], rel=1e-4)
    assert [layer["stands_for"] for layer in ours["layers"]] == [layer["stands_for"] for layer in resident["layers"]] and ours["merged"]
    for mine, theirs in zip(ours["layers"], resident["layers"]):
        assert mine["coefficients"] == pytest.approx(theirs["coefficients"], rel=1e-4)


def test_mka_loss_tie_break_runs_layer_major():
    """The loss tie-break tries each near-tied merge and measures the calibration NLL through the context:
    the same losses (to fp32 tolerance) and the same choice on both paths."""
    blocks = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(3))
    method = {"name": "mka", "num_remove": 1, "k_entropy": 8, "tie_break": "loss", "tie_margin": 1.0}
    resident = compress(MethodContext(tiny_model("llama"), None, blocks, batch_size=4), method)
    ctx = MethodContext.layer_major(ModelLayerLoader(tiny_model("llama")), None, blocks, sequential("device"), "cpu", torch.float32, batch_size=4)
    ours = compress(ctx, method)
    step, reference = ours["details"]["steps"][0], resident["details"]["steps"][0]
    assert len(reference["tie_break_loss"]) > 1  # the margin makes every pair a near-tie: the break really ran
    assert step["tie_break_loss"].keys() == reference["tie_break_loss"].keys()
    assert list(step["tie_break_loss"].values()) == pytest.approx(list(reference["tie_break_loss"].values()), rel=1e-5)
    assert step["pair"] == reference["pair"]
    assert [layer["stands_for"] for layer in ours["layers"]] == [layer["stands_for"] for layer in resident["layers"]]


def test_every_registered_method_runs_layer_major():
    import layerfold.methods as methods

    methods._load_all()
    # every method declares it runs layer by layer (some settings may still be refused by a callable declaration)
    assert [name for name, spec in sorted(methods.REGISTRY.items()) if spec.capabilities.layer_major is False] == []


def test_a_method_not_written_for_layer_major_fails_before_loading_a_layer(stories, story_blocks, monkeypatch):
    import layerfold.methods as methods

    methods._load_all()
    sleb = methods.REGISTRY["sleb"]
    monkeypatch.setitem(methods.REGISTRY, "sleb", dataclasses.replace(sleb, capabilities=dataclasses.replace(sleb.capabilities, layer_major=False)))
    method, setting = {"name": "sleb", "num_remove": 2}, "method=sleb"
    path, _, tokenizer = stories
    loads = []

    class Counting(SafetensorsLayerLoader):
        def load_layer(self, index, device, dtype):
            loads.append(index)
            return super().load_layer(index, device, dtype)

    ctx = MethodContext.layer_major(Counting(path), tokenizer, story_blocks, sequential("device"), "cpu", torch.float32)
    for attempt in (lambda: check_layer_major(method), lambda: compress(ctx, method)):
        with pytest.raises(LayerMajorUnsupported, match=setting) as error:
            attempt()
        assert "hardware=sequential" in str(error.value) and "hardware=resident" in str(error.value)
    assert loads == [] and ctx.num_layers == 5


# The compress stage ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [
    {"name": "shortgpt", "num_remove": 2},
    {"name": "laco", "rdsc": "paper", "merge_layers": 3, "threshold": 0.1, "interval": 1},
])
def test_sequential_compress_writes_the_resident_checkpoint(stories, story_blocks, tmp_path, method):
    from layerfold.compression import compress_layer_major, compress_resident

    path, model, _ = stories
    stats = BoundaryStatistics(6)
    from layerfold.capture import capture_statistics

    capture_statistics(model, story_blocks, 2, desc=None, stats=stats)
    args = (story_blocks, stats, method)
    plan_r, facts_r, _ = compress_resident(path, *args, 2, torch.device("cpu"), torch.float32, torch.bfloat16, tmp_path / "resident")
    plan_s, facts_s, _ = compress_layer_major(path, *args, sequential("host"), 2, torch.device("cpu"), torch.float32, torch.bfloat16, tmp_path / "sequential")
    assert structure(plan_s) == structure(plan_r) and (plan_r["merged"] if method["name"] == "laco" else plan_r["removed"])
    assert {k: v for k, v in facts_s.items() if k.startswith("params_")} == {k: v for k, v in facts_r.items() if k.startswith("params_")}
    ours, _, config = assert_same_checkpoint(tmp_path / "resident", tmp_path / "sequential")
    assert config["num_hidden_layers"] == len(plan_r["layers"])
    resident = {p.name: p for p in (tmp_path / "resident").iterdir()}
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if name in resident:
            assert json.loads(ours[name].read_text()) == json.loads(resident[name].read_text()), name
    assert structure(json.loads(ours["plan.json"].read_text())) == structure(plan_r)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_layerwise_shards_load_as_one_model(stories, tmp_path):
    """Shards smaller than a layer: one file per layer plus the index, and from_pretrained reads the same model."""
    from layerfold.execution import save_layerwise

    path, model, tokenizer = stories
    save_layerwise(SafetensorsLayerLoader(path), tokenizer, tmp_path / "sharded", torch.float32, torch.float32, max_shard_bytes=1)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model*"))
    assert files == [f"model-{k:05d}-of-00006.safetensors" for k in range(1, 7)] + ["model.safetensors.index.json"]
    reloaded, _ = load_checkpoint(tmp_path / "sharded", "cpu", torch.float32)
    for (name, ours), theirs in zip(reloaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_trials_benchmark_runs_on_cpu_with_the_tiny_shape(tmp_path):
    from conftest import load_benchmark

    record = load_benchmark("sequential_trials").main(["--shape", "tiny", "--out", str(tmp_path / "trials.json")])
    rows = {r["name"]: r for r in record["rows"]}
    assert list(rows) == ["sleb dense nll", "sleb step", "laco reference", "laco trial"]
    assert sorted(rows["sleb step"]["losses"]) == ["1", "2"] and all(r["seconds"] > 0 and r["peak_host_mib"] > 0 for r in rows.values())
    assert -1.0 <= rows["laco trial"]["similarity"] <= 1.0 and json.loads((tmp_path / "trials.json").read_text()) == record
