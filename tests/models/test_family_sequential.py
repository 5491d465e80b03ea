"""Layer by layer on every family: the same statistics, NLL and removal plans as resident, from checkpoints in the
layout transformers saves (MoE experts one by one on disk, fused in the model)."""

from __future__ import annotations

import pytest
import torch

from layerfold.capture import BoundaryStatistics
from layerfold.capture.stats import capture_statistics as resident_capture
from layerfold.execution import SafetensorsLayerLoader, capture_statistics, save_layerwise, token_nll
from layerfold.execution.loss import token_nll as resident_token_nll
from layerfold.methods import MethodContext, compress
from layerfold.models import load_checkpoint, save_checkpoint
from layerfold.models.tiny import MOE_FAMILIES, TINY_FAMILIES, tiny_model, tiny_tokenizer

SEQUENTIAL = {"mode": "sequential", "activations": "host", "logits_chunk": 7}
TOL = dict(rel=1e-5, abs=1e-6)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models only (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{family: checkpoint dir}``: each tiny model saved by save_pretrained (its on-disk layout)."""
    folder = tmp_path_factory.mktemp("families")
    paths = {}
    for family in TINY_FAMILIES:
        paths[family] = folder / family
        save_checkpoint(tiny_model(family), tiny_tokenizer(), paths[family], dtype=torch.float32)
    return paths


def blocks(n: int = 6, seq: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 99, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_statistics_and_nll_match_resident(family: str, checkpoints) -> None:
    """Per-token boundary statistics (what ShortGPT, Gromov, MKA, Streamline read) and the next-token NLL, MoE included."""
    path = checkpoints[family]
    model, _ = load_checkpoint(path, "cpu", torch.float32)
    ids = blocks()
    ours = BoundaryStatistics(model.config.num_hidden_layers + 1)
    capture_statistics(path, ids, SEQUENTIAL, ours, batch_size=4)
    theirs = resident_capture(model, ids, batch_size=3, desc=None)
    for name, value in theirs.tensors().items():
        torch.testing.assert_close(ours.tensors()[name], value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
    nll, count, _ = token_nll(path, ids, SEQUENTIAL, batch_size=4)
    reference, reference_count = resident_token_nll(model, ids, batch_size=2)
    assert count == reference_count and nll == pytest.approx(reference, **TOL)


@pytest.mark.parametrize("family", ["gemma2", "phi3", "deepseek_v3", "llama4_text", "qwen2_moe", "gpt2"])
@pytest.mark.parametrize("method", [
    {"name": "sleb", "num_remove": 2},
    {"name": "mka", "num_remove": 1, "k_entropy": 3, "n_neighbors": 3},
    {"name": "streamline", "num_remove": 1, "replacement": "transformer_layer"},
], ids=lambda m: m["name"])
def test_removal_plans_match_resident(family: str, method: dict, checkpoints, tmp_path) -> None:
    """SLEB's trials, MKA's re-captured merge and a Streamline window choose the same layers both ways, and the
    layer-by-layer checkpoint of the plan loads as the resident result."""
    path = checkpoints[family]
    model, tokenizer = load_checkpoint(path, "cpu", torch.float32)
    calibration = blocks(8, 10, seed=2)
    resident = compress(MethodContext(model, tokenizer, calibration, batch_size=4), method)
    ctx = MethodContext.layer_major(SafetensorsLayerLoader(path), tokenizer, calibration, SEQUENTIAL, "cpu", torch.float32, batch_size=4)
    ours = compress(ctx, method)
    assert {k: v for k, v in ours.items() if k != "details"} == {k: v for k, v in resident.items() if k != "details"}
    from layerfold.execution import PlannedLayerLoader

    save_layerwise(PlannedLayerLoader(SafetensorsLayerLoader(path), ctx.plan), tokenizer, tmp_path / "sequential", torch.float32, torch.float32)
    written, _ = load_checkpoint(tmp_path / "sequential", "cpu", torch.float32)
    theirs = model.state_dict()
    for key, value in written.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-6, atol=1e-7, msg=key)
    assert written.config.num_hidden_layers == model.config.num_hidden_layers


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_checkpoint_layout_round_trips(family: str, checkpoints) -> None:
    """The loader reads each layer as from_pretrained builds it (experts fused, expert first) from the per-expert files."""
    loader = SafetensorsLayerLoader(checkpoints[family])
    model, _ = load_checkpoint(checkpoints[family], "cpu", torch.float32)
    layers = model.model.layers
    for i in range(loader.num_layers):
        ours, theirs = loader.load_layer(i, "cpu", torch.float32), layers[i].state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), i


def test_moe_benchmark_runs_the_tiny_shapes(tmp_path) -> None:
    """benchmarks/moe_sequential.py on tiny MoE shapes (CPU): parity met, ShortGPT pruned each shape, finite perplexities."""
    from conftest import load_benchmark

    record = load_benchmark("moe_sequential").main(["--shape", "tiny-qwen3-moe", "tiny-deepseek-v3", "--calib", "4x16", "--windows", "2",
                                                    "--seq-len", "16", "--out", str(tmp_path / "moe.json")])
    assert record["rows"][0]["met"] and (tmp_path / "moe.json").exists()
    for shape in record["shapes"]:
        rows = {r["name"]: r for r in shape["rows"]}
        assert rows["compress"]["layers_after"] == 3 and rows["perplexity pruned"]["layers"] == 3
        assert all(map(lambda r: r["perplexity"] > 0, (rows["perplexity dense"], rows["perplexity pruned"])))
