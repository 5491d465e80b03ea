"""Layer-major execution gives the resident numbers: capture statistics and perplexity, every family, both activation placements."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REPO, TINY_CONFIGS, tiny_model
from execution_fixtures import STORY, _single_thread, story_blocks  # noqa: F401  (fixtures; stories comes from conftest)
from transformers import AutoModelForCausalLM, Qwen2Config

from layerfold.capture import BoundaryStatistics
from layerfold.capture import capture_statistics as resident_capture
from layerfold.config import ConfigError, HardwareConfig, compose, parse_params
from layerfold.evaluation.perplexity import perplexity as resident_perplexity
from layerfold.evaluation.perplexity_layerwise import perplexity
from layerfold.execution import LayerMajorRunner, ModelLayerLoader, TokenNLL, capture_statistics, token_nll
from layerfold.execution.layer_major import LayerMajorError
from layerfold.execution.loss import token_nll as resident_token_nll

RESIDENT = {"mode": "resident"}


def sequential(activations: str, **extra) -> dict:
    return {"mode": "sequential", "activations": activations, **extra}


def assert_same_statistics(ours: BoundaryStatistics, reference: BoundaryStatistics) -> None:
    assert (ours.tokens, ours.sequences) == (reference.tokens, reference.sequences)
    captured = ours.captured_pairs
    torch.testing.assert_close(ours.cosine_sum[captured], reference.cosine_sum[captured], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.last_angular_sum, reference.last_angular_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.sample_features, reference.sample_features, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activations", ["device", "host"])
def test_capture_statistics_match_resident_on_stories260k(stories, story_blocks, activations):
    path, _, _ = stories
    layers = 5
    resident = BoundaryStatistics(layers + 1)
    report = capture_statistics(path, story_blocks, RESIDENT, resident, batch_size=2)
    assert report.mode == "resident"
    ours = BoundaryStatistics(layers + 1)
    report = capture_statistics(path, story_blocks, sequential(activations, prefetch=True), ours, batch_size=2)
    assert (report.mode, report.activations, report.layers_run) == ("sequential", activations, layers)
    assert_same_statistics(ours, resident)
    # ... and both equal the capture stage's own function on the loaded model.
    assert_same_statistics(resident, resident_capture(stories[1], story_blocks, batch_size=3, desc=None))


def test_limited_distance_statistics_keep_the_captured_pairs(stories, story_blocks):
    path, model, _ = stories
    ours = BoundaryStatistics(6, max_distance=1)
    capture_statistics(path, story_blocks, sequential("device", batch_size=3), ours)
    reference = resident_capture(model, story_blocks, batch_size=5, desc=None)
    assert_same_statistics(ours, reference)
    assert torch.isnan(ours.cosine_sum[0, 2])  # not captured at distance 2, and says so


@pytest.mark.parametrize("activations", ["device", "host"])
def test_perplexity_matches_resident_on_stories260k(stories, activations):
    path, model, tokenizer = stories
    text = STORY * 2
    reference = resident_perplexity(model, tokenizer, text, seq_len=32, max_windows=6, add_bos=True, batch_size=2, desc=None)
    resident = perplexity(path, tokenizer, text, 32, RESIDENT, max_windows=6, add_bos=True, batch_size=2)
    ours = perplexity(path, tokenizer, text, 32, sequential(activations, logits_chunk=13), max_windows=6, add_bos=True, batch_size=4)
    for result in (resident, ours):
        assert {k: v for k, v in result.items() if k not in ("perplexity", "execution")} == {k: v for k, v in reference.items() if k != "perplexity"}
        assert result["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    assert ours["execution"]["mode"] == "sequential" and ours["execution"]["activations"] == activations
    assert 1.0 < ours["perplexity"] < 512  # a trained model on its own domain: far better than uniform


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_matches_resident(family):
    model = tiny_model(family)
    blocks = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(1))
    layers = model.config.num_hidden_layers
    ours = BoundaryStatistics(layers + 1)
    capture_statistics(ModelLayerLoader(model), blocks, sequential("host", prefetch=True), ours, batch_size=2)
    assert_same_statistics(ours, resident_capture(model, blocks, batch_size=5, desc=None))
    nll, count, _ = token_nll(ModelLayerLoader(model), blocks, sequential("device", logits_chunk=7), batch_size=3)
    reference, reference_count = resident_token_nll(model, blocks, batch_size=2)
    assert count == reference_count == 5 * 11
    assert nll == pytest.approx(reference, rel=1e-5)


def test_sliding_window_layers_get_their_own_mask():
    """Qwen2 with sliding-window upper layers: every layer must get the mask of its own type."""
    config = Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                         num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    assert config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    blocks = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    runner = LayerMajorRunner(ModelLayerLoader(model), "cpu", torch.float32, activations="device", batch_size=2)
    acts = runner.embed(blocks)
    masks = [call.kwargs["attention_mask"] for call in acts.calls[0]]
    assert not torch.equal(masks[0], masks[3])  # the probe recorded two different masks
    head = TokenNLL(runner.final_norm(), runner.lm_head(), acts, runner.num_layers)
    runner.run_layers(acts, on_boundary=head)
    reference, _ = resident_token_nll(model, blocks, batch_size=2)
    assert head.nll == pytest.approx(reference, rel=1e-5)


def test_run_layers_in_parts_equals_one_run():
    """A method may ask for layers a..b over the activations it holds; the parts chain to the whole."""
    model = tiny_model("llama")
    blocks = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(3))
    whole = LayerMajorRunner(ModelLayerLoader(model), "cpu", torch.float32, activations="host")
    acts = whole.embed(blocks)
    whole.run_layers(acts)
    parts = LayerMajorRunner(ModelLayerLoader(model), "cpu", torch.float32, activations="host")
    split = parts.embed(blocks)
    seen = []
    parts.run_layers(split, 0, 1, on_boundary=lambda boundary, batch, hidden: seen.append(boundary))
    with pytest.raises(ValueError, match="hold boundary 1"):
        parts.run_layers(split, 2, 4)
    parts.run_layers(split, 1, 4)
    assert seen == [0, 1]
    assert split.boundary == acts.boundary == 4
    for a, b in zip(split.hidden, acts.hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_settings_are_named():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="hardware.activations='gpu'"):
        LayerMajorRunner(ModelLayerLoader(model), "cpu", torch.float32, activations="gpu")
    with pytest.raises(ValueError, match="hardware.mode='parallel'"):
        token_nll(model, torch.zeros(1, 4, dtype=torch.long), {"mode": "parallel"})
    with pytest.raises(ValueError, match="hardware.logits_chunk=0"):
        token_nll(model, torch.zeros(1, 4, dtype=torch.long), sequential("device", logits_chunk=0))
    with pytest.raises(ValueError, match="num_sequences, seq_len"):
        LayerMajorRunner(ModelLayerLoader(model), "cpu", torch.float32).embed(torch.zeros(4, dtype=torch.long))


def test_a_loader_without_outer_weights_is_refused():
    class NoOuter(ModelLayerLoader):
        def load_outer(self, device, dtype):
            return {}

    with pytest.raises(LayerMajorError, match="no weights for"):
        LayerMajorRunner(NoOuter(tiny_model("llama")), "cpu", torch.float32)


def test_resident_and_sequential_report_memory(stories, story_blocks):
    path, _, _ = stories
    _, _, report = token_nll(path, story_blocks, sequential("device"), batch_size=5)
    assert report.peak_host_mib > 0 and report.peak_gpu_mib is None  # CPU run: no GPU figure rather than a made-up one
    assert report.activation_mib == pytest.approx(5 * 32 * 64 * 4 / 2**20, abs=0.05)
    assert math.isfinite(report.seconds) and report.layers_run == 5


def test_hardware_groups_drive_the_entry_points(stories, story_blocks):
    """conf/hardware/*.yaml -> params.hardware -> the entry points: the mode is chosen by config, never by code."""
    path, model, _ = stories
    reference, _ = resident_token_nll(model, story_blocks)
    for overrides, mode in ((["hardware=sequential", "hardware.batch_size=2"], "sequential"), ([], "resident")):
        hardware = parse_params(compose(REPO / "conf", overrides)).hardware
        nll, _, report = token_nll(path, story_blocks, hardware, batch_size=5)
        assert report.mode == mode and nll == pytest.approx(reference, rel=1e-5)
    nll, _, report = token_nll(path, story_blocks, HardwareConfig(mode="sequential", activations="host"))
    assert report.activations == "host" and nll == pytest.approx(reference, rel=1e-5)
    with pytest.raises(ConfigError, match="hardware.activations='gpu' is not allowed"):
        parse_params(compose(REPO / "conf", ["hardware=sequential", "hardware.activations=gpu"]))
