"""Streaming boundary statistics equal the old stack-everything math, in either feeding order.

The reference below is the pre-streaming implementation, kept here on purpose: plain forward hooks
(no layerfold code) collect every boundary of every block, which are stacked, normalised in fp32 and
reduced with one einsum, exactly as ``BoundaryStatistics.update`` did before it streamed.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import models_dir, tiny_model

from layerfold.capture import BoundaryStatistics, NonFiniteActivationError, capture_statistics
from layerfold.models.llama2c import load_llama2c_model
from layerfold.models.resources import capture_bytes_per_sequence

STORIES = models_dir() / "stories260K"


@functools.cache  # capture only reads the model; load it once per test session
def stories_model() -> torch.nn.Module:
    if not STORIES.is_dir():
        pytest.skip("stories260K not present (set LAYERFOLD_MODELS_DIR)")
    return load_llama2c_model(STORIES / "stories260K.bin")


MODELS = {"stories260k": stories_model, "tiny_llama": lambda: tiny_model("llama")}


def make_blocks(model: torch.nn.Module, n: int = 5, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def reference_boundaries(model: torch.nn.Module, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Boundary ``i`` of every block, ``[n, seq, hidden]``, from hooks written here (input of layer 0, output of each layer)."""
    layers = model.model.layers
    seen: dict[int, torch.Tensor] = {}

    def entering(module, args, kwargs):
        seen[0] = (args[0] if args else kwargs["hidden_states"]).detach()

    def leaving(index):
        return lambda module, args, output: seen.__setitem__(index + 1, (output[0] if isinstance(output, tuple) else output).detach())

    handles = [layers[0].register_forward_pre_hook(entering, with_kwargs=True)]
    handles += [layer.register_forward_hook(leaving(i)) for i, layer in enumerate(layers)]
    try:
        model(input_ids=blocks, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in range(len(layers) + 1)]


def old_statistics(boundaries: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The previous implementation's math over all blocks at once (means instead of sums)."""
    stacked = torch.stack(boundaries, dim=2)  # [n, seq, B, hidden]
    unit = F.normalize(stacked.float(), dim=-1)
    flat = unit.flatten(0, 1)
    last = unit[:, -1]
    cos = torch.einsum("bid,bjd->bij", last, last).clamp(-1.0, 1.0)
    return {
        "cosine": (torch.einsum("nid,njd->ij", flat, flat).double() / flat.shape[0]).float(),
        "last_token_angular": (torch.arccos(cos) / torch.pi).mean(0),
        "sample_features": stacked[:, 1:].float().mean(dim=1).transpose(0, 1),
    }


def assert_matches_old(stats: BoundaryStatistics, old: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    torch.testing.assert_close(stats.cosine, old["cosine"], rtol=0, atol=atol)
    angular, old_angular = stats.last_token_angular, old["last_token_angular"]
    off_diagonal = ~torch.eye(len(angular), dtype=torch.bool)
    torch.testing.assert_close(angular[off_diagonal], old_angular[off_diagonal], rtol=0, atol=atol)
    assert torch.all(angular.diagonal() == 0)  # exact by construction; the old math left arccos(1 - rounding)
    assert old_angular.diagonal().abs().max() < 1e-3
    torch.testing.assert_close(stats.sample_features, old["sample_features"], rtol=0, atol=atol)


def feed_boundary_major(stats: BoundaryStatistics, per_batch: dict[int, list[torch.Tensor]], watch=None) -> None:
    """Boundary 0 of every batch, then boundary 1, ... as a layer-at-a-time executor would."""
    for boundary in range(stats.num_boundaries):
        for batch_id, boundaries in per_batch.items():
            stats.add(boundary, batch_id, boundaries[boundary])
        if watch is not None:
            watch(boundary)


# Equality with the old implementation ------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_resident_capture_matches_the_old_math(name, batch_size):
    model = MODELS[name]()
    blocks = make_blocks(model)
    stats = capture_statistics(model, blocks, batch_size, desc=None)
    assert_matches_old(stats, old_statistics(reference_boundaries(model, blocks)))
    assert (stats.tokens, stats.sequences) == (blocks.numel(), blocks.shape[0])
    assert stats.held_bytes == 0  # nothing of a finished batch stays behind


@pytest.mark.parametrize("name", sorted(MODELS))
def test_boundary_major_feeding_matches_the_old_math(name):
    """Batches fed boundary-major, with ids out of order, give the same statistics; features follow the ids."""
    model = MODELS[name]()
    blocks = make_blocks(model, n=6)
    all_boundaries = reference_boundaries(model, blocks)
    per_batch = {batch_id: [b[rows] for b in all_boundaries] for batch_id, rows in ((2, slice(4, 6)), (0, slice(0, 3)), (1, slice(3, 4)))}
    stats = BoundaryStatistics(num_boundaries=len(all_boundaries))
    feed_boundary_major(stats, per_batch)
    assert_matches_old(stats, old_statistics(all_boundaries))
    assert (stats.tokens, stats.sequences) == (blocks.numel(), 6)


def test_update_with_stacked_boundaries_still_works():
    model = tiny_model("llama")
    blocks = make_blocks(model)
    boundaries = reference_boundaries(model, blocks)
    stats = BoundaryStatistics(num_boundaries=len(boundaries))
    stats.update(torch.stack([b[:2] for b in boundaries], dim=2))
    stats.update(torch.stack([b[2:] for b in boundaries], dim=2))
    assert_matches_old(stats, old_statistics(boundaries))


def test_half_precision_activations_are_kept_losslessly():
    """A bf16 model's boundaries are stored as they are; storing them in fp32 changes nothing beyond rounding."""
    model = tiny_model("llama").to(torch.bfloat16)
    blocks = make_blocks(model)
    stats = capture_statistics(model, blocks, 2, desc=None)
    wide = capture_statistics(model, blocks, 2, desc=None, store_dtype=torch.float32)
    torch.testing.assert_close(stats.cosine, wide.cosine, rtol=0, atol=1e-6)
    assert_matches_old(stats, old_statistics(reference_boundaries(model, blocks)))


def test_bfloat16_store_of_an_fp32_model_costs_little_accuracy():
    """The documented cost of ``store_dtype=bfloat16`` on stories260K (fp32): mean cosines move by < 1e-3."""
    model = stories_model()
    blocks = make_blocks(model, n=4, seq=64)
    exact = capture_statistics(model, blocks, 2, desc=None)
    rounded = capture_statistics(model, blocks, 2, desc=None, store_dtype=torch.bfloat16)
    error = (rounded.cosine - exact.cosine).abs().max().item()
    print(f"bf16 store: max |d mean cosine| = {error:.2e}")
    assert 0 < error < 1e-3  # it does round (the option took effect), and only a little
    torch.testing.assert_close(rounded.last_token_angular, exact.last_token_angular)  # last tokens are kept in fp32


# Limited pair distance: what is kept, what is freed ------------------------------------------------


@pytest.mark.parametrize("max_distance", [1, 2])
def test_max_distance_keeps_near_pairs_only(max_distance):
    model = stories_model()  # 5 layers: 6 boundaries
    blocks = make_blocks(model)
    full = capture_statistics(model, blocks, 2, desc=None)
    near = capture_statistics(model, blocks, 2, desc=None, max_distance=max_distance)
    index = torch.arange(full.num_boundaries)
    kept = (index[:, None] - index[None, :]).abs() <= max_distance
    torch.testing.assert_close(near.cosine[kept], full.cosine[kept], rtol=0, atol=1e-6)
    assert torch.isnan(near.cosine[~kept]).all()
    torch.testing.assert_close(near.last_token_angular, full.last_token_angular)  # last-token pairs stay complete
    torch.testing.assert_close(near.sample_features, full.sample_features)
    reloaded = BoundaryStatistics.from_tensors(near.tensors())
    assert reloaded.max_distance == max_distance
    torch.testing.assert_close(reloaded.cosine, near.cosine, equal_nan=True)


def test_max_distance_frees_boundaries_that_cannot_pair_again():
    """Boundary-major over three batches: with ``max_distance=2`` each batch holds a ring of 5 boundaries
    whatever the depth; with ``max_distance=1`` only the previous boundary (and its norms); everything is
    released once the last boundary is in."""
    model = stories_model()
    blocks = make_blocks(model, n=3)
    all_boundaries = reference_boundaries(model, blocks)
    per_batch = {i: [b[i : i + 1] for b in all_boundaries] for i in range(3)}
    seq, hidden = blocks.shape[1], all_boundaries[0].shape[-1]
    one_boundary = seq * hidden * 4  # fp32 states (the ring's norms come from the dot products)

    def run(max_distance):
        held = []
        stats = BoundaryStatistics(len(all_boundaries), max_distance=max_distance)
        feed_boundary_major(stats, per_batch, watch=lambda boundary: held.append(stats.held_bytes))
        return stats, held

    chain, chain_held = run(1)
    ring, ring_held = run(2)
    full, full_held = run(None)
    small_parts = 3 * 2 * len(all_boundaries) * hidden * 4  # last-token vectors and features of 3 batches
    assert len(all_boundaries) > 5  # so the ring of max_distance=2 is smaller than every boundary
    assert chain_held[:-1] == [3 * (one_boundary + seq * 4) + small_parts] * (len(all_boundaries) - 1)
    assert ring_held[4:-1] == [3 * (5 * one_boundary) + small_parts] * (len(all_boundaries) - 5)
    assert full_held[:-1] == [3 * (len(all_boundaries) * one_boundary) + small_parts] * (len(all_boundaries) - 1)
    assert chain_held[-1] == ring_held[-1] == full_held[-1] == 0
    for near in (chain, ring):
        torch.testing.assert_close(near.cosine.diagonal(1), full.cosine.diagonal(1), rtol=0, atol=1e-6)
        torch.testing.assert_close(near.cosine.diagonal(), full.cosine.diagonal(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ring.cosine.diagonal(2), full.cosine.diagonal(2), rtol=0, atol=1e-6)
    assert torch.isnan(chain.cosine.diagonal(2)).all() and torch.isnan(ring.cosine.diagonal(3)).all()


def test_adjacent_pairs_refuse_a_boundary_changed_in_place():
    """max_distance=1 holds the previous boundary by reference: if the model changed it in place, capture says so."""
    stats = BoundaryStatistics(3, max_distance=1)
    h = torch.randn(1, 4, 8)
    stats.add(0, 0, h)
    h.mul_(2.0)  # what a model doing in-place residual adds on a hooked output would do
    with pytest.raises(RuntimeError, match="changed in place"):
        stats.add(1, 0, torch.randn(1, 4, 8))


# The resident path and the memory estimate -------------------------------------------------------


def test_capture_never_computes_logits():
    model = tiny_model("llama")

    def refuse(*_):
        raise AssertionError("the LM head ran during capture")

    handle = model.lm_head.register_forward_pre_hook(refuse)
    try:
        stats = capture_statistics(model, make_blocks(model), 2, desc=None)
    finally:
        handle.remove()
    assert stats.sequences == 5


@pytest.mark.parametrize("max_distance", [1, 2, None])
def test_capture_reads_nothing_back_to_the_host_until_the_end(monkeypatch, max_distance):
    """Every sum stays on the activations' device while the model runs (on an accelerator a host read waits
    for all queued work); the host reads them once, in ``synchronize``, and the ring's index tensors are
    made once per layout, not once per batch."""
    model = tiny_model("llama")
    reads = []
    for method in ("cpu", "item", "tolist"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _o=original, _m=method, **k: (reads.append(_m), _o(self, *a, **k))[1])
    reads_before_sync = []
    original_sync = BoundaryStatistics.synchronize
    monkeypatch.setattr(BoundaryStatistics, "synchronize", lambda self: (reads_before_sync.append(list(reads)), original_sync(self))[1])
    stats = capture_statistics(model, make_blocks(model, n=6), 2, desc=None, max_distance=max_distance)
    assert reads_before_sync[0] == []
    monkeypatch.undo()
    layouts = stats._device_sums._pairs  # one entry per ring layout, shared by all 3 batches; no ring for adjacent pairs
    assert (len(layouts) == 0) if max_distance == 1 else (0 < len(layouts) <= model.config.num_hidden_layers)
    assert torch.isfinite(stats.cosine.diagonal(1)).all()


def test_non_finite_activations_stop_the_capture_with_the_layer_named():
    """With the check deferred by a batch, a broken layer still fails the capture and is named."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteActivationError, match=r"output of decoder layer 1 \(layer boundary 2\)"):
        capture_statistics(model, make_blocks(model, n=6), 2, desc=None)


def test_memory_estimate_counts_what_the_accumulator_holds():
    """The guard's per-sequence capture term is exactly what one in-flight sequence holds."""
    model = tiny_model("llama")
    blocks = make_blocks(model, n=1, seq=16)
    boundaries = reference_boundaries(model, blocks)
    stats = BoundaryStatistics(num_boundaries=len(boundaries))
    for i, hidden in enumerate(boundaries[:-1]):
        stats.add(i, 0, hidden)
    assert stats.held_bytes == capture_bytes_per_sequence(model.config.to_dict(), torch.float32, seq_len=16)


# Bad input -------------------------------------------------------------------------------------


def test_bad_feeding_names_the_problem():
    stats = BoundaryStatistics(num_boundaries=3)
    h = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="starts at boundary 1"):
        stats.add(1, 0, h)
    with pytest.raises(ValueError, match=r"boundary=3 is out of range 0\.\.2"):
        stats.add(3, 0, h)
    with pytest.raises(ValueError, match=r"must be \[batch, seq, hidden\]"):
        stats.add(0, 0, h[0])
    stats.add(0, 0, h)
    with pytest.raises(ValueError, match="expects 1"):
        stats.add(2, 0, h)
    with pytest.raises(ValueError, match="has shape"):
        stats.add(1, 0, h[:1])
    stats.add(1, 0, h)
    stats.add(2, 0, h)
    with pytest.raises(ValueError, match="already has all 3 boundaries"):
        stats.add(0, 0, h)
    with pytest.raises(ValueError, match="padding"):
        stats.add(0, 1, h, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    stats.add(0, 1, h, attention_mask=torch.ones(2, 4))  # an all-ones mask is fine
    with pytest.raises(ValueError, match="update"):
        stats.update(torch.randn(2, 4, 5, 8))
    with pytest.raises(ValueError, match="max_distance=0"):
        BoundaryStatistics(num_boundaries=3, max_distance=0)
    with pytest.raises(ValueError, match="store_dtype"):
        BoundaryStatistics(num_boundaries=3, store_dtype=torch.int8)
