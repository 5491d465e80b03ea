"""Efficiency measurement: the FLOP bound of a tiny model with layers removed, the suspect flag, what the
timed forwards compute, and the report's unpaired speed-ups (the timing primitive: tests/backbone/test_runtime.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import REPO, FakeClock, tiny_model

from layerfold.config import ConfigError, compose, parse_params
from layerfold.evaluation.efficiency import (
    compare_efficiency,
    efficiency_speedups,
    forward_flops_per_token,
    measure_efficiency,
    speedup_check,
)
from layerfold.report import markdown_report
from layerfold.surgery import remove_layers

# tests/conftest.py's tiny Llama: hidden 32, MLP 64, 4 query heads and 2 KV heads of 8, vocabulary 128, 4 layers
HIDDEN, MLP, KV, VOCAB = 32, 64, 16, 128
LAYER_PARAMS = HIDDEN * HIDDEN * 2 + HIDDEN * KV * 2 + 3 * HIDDEN * MLP + 2 * HIDDEN  # q, o; k, v; gate, up, down; 2 norms
HEAD = HIDDEN * VOCAB


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models only: one intra-op thread (see conftest.one_thread)."""


def test_flop_bound_of_a_tiny_model_with_layers_removed():
    dense = tiny_model("llama")
    pruned = remove_layers(copy.deepcopy(dense), [1, 2])
    context = 10
    per_layer = 2 * LAYER_PARAMS + 4 * HIDDEN * context  # weights, then QK^T and attention x V over 10 positions
    assert forward_flops_per_token(dense, context) == 4 * per_layer + 2 * HEAD  # the embedding lookup costs nothing
    assert forward_flops_per_token(pruned, context) == 2 * per_layer + 2 * HEAD
    # a prefill keeping one position's logits of 16 charges the head 1/16 per token
    assert forward_flops_per_token(dense, context, logits_fraction=1 / 16) == 4 * per_layer + 2 * HEAD / 16

    measured = compare_efficiency({"dense": dense, "pruned": pruned}, batch_size=1, prompt_len=16, new_tokens=4, warmup=0, repeats=1)
    decode_per_layer = 2 * LAYER_PARAMS + 4 * HIDDEN * (16 + 2.5)  # average context of decode steps 17..20
    bound = (4 * decode_per_layer + 2 * HEAD) / (2 * decode_per_layer + 2 * HEAD)
    assert measured["speedups"]["pruned"]["decode"]["speedup_bound"] == pytest.approx(bound, abs=1e-4)
    assert bound < 4 / 2  # the head does not shrink: below the layer ratio


def test_measurement_suspect_only_when_the_whole_range_beats_the_bound():
    tight = speedup_check((10.0, 9.5, 10.5), (4.0, 3.9, 4.1), bound=2.0)
    assert tight["speedup"] == 2.5 and tight["speedup_min"] == pytest.approx(9.5 / 4.1, abs=1e-4)
    assert tight["measurement_suspect"] is True
    assert speedup_check((10.0, 5.0, 15.0), (4.0, 3.0, 8.0), bound=2.0)["measurement_suspect"] is False  # inside the spread
    assert speedup_check((10.0, 9.9, 10.1), (6.0, 5.9, 6.1), bound=2.0)["measurement_suspect"] is False  # below the bound
    assert speedup_check((10.0, 9.9, 10.1), (4.0, 3.9, 4.1), bound=None)["measurement_suspect"] is False


def test_a_timing_that_counts_only_layers_is_flagged():
    """A fake clock charging 1 s per decoder layer (nothing for the LM head) measures exactly 2x for 4 -> 2
    layers with no spread: more than the FLOP bound allows, so the measurement is flagged."""
    clock = FakeClock()
    dense = tiny_model("llama")
    pruned = remove_layers(copy.deepcopy(dense), [1, 2])
    for model in (dense, pruned):
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda *_: setattr(clock, "now", clock.now + 1.0))
    measured = compare_efficiency({"dense": dense, "pruned": pruned}, batch_size=1, prompt_len=16, new_tokens=4,
                                  warmup=1, repeats=3, clock=clock)
    for phase in ("prefill", "decode"):
        check = measured["speedups"]["pruned"][phase]
        assert check["speedup"] == check["speedup_min"] == 2.0 and check["speedup_bound"] < 2.0
        assert check["measurement_suspect"] is True
    assert measured["models"]["dense"]["runs_ms"]["prefill"] == [4000.0] * 3  # 4 layers x 1 s, in ms


def test_prefill_keeps_one_logit_and_decode_steps_one_token_on_the_cache():
    model = tiny_model("llama")
    head_lengths, layer_lengths = [], []
    model.lm_head.register_forward_pre_hook(lambda _m, args: head_lengths.append(args[0].shape[1]))
    model.model.layers[0].register_forward_pre_hook(lambda _m, args: layer_lengths.append(args[0].shape[1]))
    warmup, repeats, prompt, new = 3, 2, 12, 5
    record = measure_efficiency(model, batch_size=2, prompt_len=prompt, new_tokens=new, warmup=warmup, repeats=repeats)

    assert set(head_lengths) == {1}  # never a batch x prompt x vocabulary logits tensor
    runs = warmup + repeats
    prefills = runs + runs + 1  # timed prefills, decode preparations, the memory run's prefill
    assert layer_lengths.count(prompt) == prefills
    assert layer_lengths.count(1) == runs + (runs + 1) * new  # one-token forwards, then decode steps
    assert len(layer_lengths) == prefills + runs + (runs + 1) * new

    assert record["prefill_logits"] == "last position" and record["repeats"] == repeats and record["warmup"] == warmup
    assert len(record["runs_ms"]["prefill"]) == len(record["runs_ms"]["decode"]) == repeats
    low, high = record["prefill_latency_ms_range"]
    assert low <= record["prefill_latency_ms"] <= high
    assert record["decode_tokens_per_s"] > 0 and record["peak_memory_kind"] == "process max RSS"


def test_compared_models_must_share_device_and_vocabulary():
    other = tiny_model("llama")
    other.resize_token_embeddings(64)
    with pytest.raises(ValueError, match="vocabulary"):
        compare_efficiency({"a": tiny_model("llama"), "b": other}, prompt_len=4, new_tokens=1, repeats=1)


def test_config_asks_for_three_warmup_rounds():
    with pytest.raises(ConfigError, match=r"eval\.efficiency\.warmup=1.*>= 3"):
        parse_params(compose(REPO / "conf", ["eval.efficiency.warmup=1"]))
    params = parse_params(compose(REPO / "conf", ["eval=gpu"]))
    assert params.eval.efficiency.warmup == 3 and params.eval.efficiency.repeats == 10


def _efficiency(prefill_ms: tuple[float, float, float], decode_ms: tuple[float, float, float], flops: tuple[float, float]) -> dict:
    (p, p_lo, p_hi), (d, d_lo, d_hi) = prefill_ms, decode_ms
    return {"device": "cpu (test)", "batch_size": 1, "prompt_len": 16, "new_tokens": 4, "prefill_latency_ms": p,
            "prefill_latency_ms_range": [p_lo, p_hi], "decode_ms_per_token": d, "decode_ms_per_token_range": [d_lo, d_hi],
            "decode_tokens_per_s": 1000 / d, "peak_memory_mib": 100.0, "peak_memory_kind": "process max RSS",
            "flops_per_token": {"prefill": flops[0], "decode": flops[1]}}


def test_report_says_the_speedup_is_unpaired_and_shows_the_bound():
    dense = {"model": {"num_layers": 30}, "efficiency": _efficiency((36.1, 35.9, 36.4), (4.2, 4.1, 4.3), (300.0, 330.0))}
    compressed = {"model": {"num_layers": 22}, "efficiency": _efficiency((18.6, 18.5, 18.8), (3.2, 3.1, 3.3), (220.0, 250.0))}
    speedups = efficiency_speedups(dense["efficiency"], compressed["efficiency"])
    assert speedups["prefill"]["speedup_bound"] == pytest.approx(300 / 220, abs=1e-4)
    assert speedups["prefill"]["measurement_suspect"] is True  # 35.9 / 18.8 = 1.91 > 1.36
    assert speedups["decode"]["measurement_suspect"] is False  # 4.1 / 3.3 = 1.24 < 1.32

    text = markdown_report(dense, compressed)
    assert "**measured in separate runs**" in text
    assert "| prefill | 1.94× [1.91–1.97] | 1.36× | **exceeds the bound by more than its spread" in text
    assert "| decode | 1.31× [1.24–1.39] | 1.32× |  |" in text


def test_report_of_older_metrics_shows_no_made_up_speedup():
    old = {"prefill_latency_ms": 50.0, "decode_tokens_per_s": 20.0, "peak_memory_mib": 100.0}
    text = markdown_report({"efficiency": old}, {"efficiency": {**old, "prefill_latency_ms": 30.0}})
    assert "| prefill | — | — | spread or FLOPs not recorded" in text


def test_bound_counts_what_the_layers_hold():
    """A layer whose projections are wider costs more: the bound follows the modules, not the layer count."""
    dense = tiny_model("llama")
    widened = copy.deepcopy(dense)
    with torch.no_grad():
        widened.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(2 * MLP, HIDDEN))
    assert forward_flops_per_token(widened, 1) - forward_flops_per_token(dense, 1) == 2 * MLP * HIDDEN
