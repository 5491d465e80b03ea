"""SLEB's one-shot mode (Shortened LLaMA's PPL criterion): every layer scored once on the dense model."""

from __future__ import annotations

import math

import torch
from conftest import tiny_model

from layerfold.methods import MethodContext, compress


def blocks() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def test_one_shot_removes_the_layers_whose_removal_costs_least_on_the_dense_model(one_thread):
    calibration = blocks()
    scored = MethodContext(tiny_model("llama"), None, calibration).removal_nll([0, 1, 2, 3])
    cfg = {"name": "sleb", "num_remove": 2, "one_shot": True, "protect_first": 0, "protect_last": 0}
    plan = compress(MethodContext(tiny_model("llama"), None, calibration), cfg)
    assert plan["details"]["removed_layers"] == sorted(sorted(scored, key=lambda i: (scored[i], i))[:2])
    dense = plan["details"]["dense_loss"]
    for candidate in plan["details"]["candidates"]:  # the perplexity increase of removing that layer alone
        expected = math.exp(scored[candidate["original_layer"]] - dense)
        assert abs(candidate["perplexity_ratio"] - expected) < 1e-5


def test_one_shot_of_one_layer_is_slebs_first_step(one_thread):
    calibration = blocks()
    iterative = compress(MethodContext(tiny_model("llama"), None, calibration), {"name": "sleb", "num_remove": 1})
    one_shot = compress(MethodContext(tiny_model("llama"), None, calibration), {"name": "sleb", "num_remove": 1, "one_shot": True})
    assert one_shot["removed"] == iterative["removed"]
