"""The documents ``eval.lm_eval.limit`` draws follow ``eval.lm_eval.seed``, not the training seed: every model and every
training seed of a sweep is scored on the same documents, so their differences stay paired."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from layerfold.evaluation import checkpoint


def _params(runtime_seed: int, eval_seed: int):
    return OmegaConf.create({
        "hardware": {"mode": "resident"}, "runtime": {"seed": runtime_seed},
        "eval": {"perplexity": {"datasets": []}, "efficiency": {"enabled": False},
                 "lm_eval": {"tasks": ["arc_easy"], "seed": eval_seed}},
    })


def test_the_document_sample_follows_the_eval_seed_not_the_training_seed(monkeypatch, tmp_path: Path) -> None:
    seen = []
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(checkpoint, "describe", lambda model: {"num_layers": 0})
    monkeypatch.setattr(checkpoint, "_benchmarks", lambda model, tok, le, seed, name, path: (seen.append(seed), {}, {}, {})[1:])
    for runtime_seed in (0, 1, 2):
        checkpoint.evaluate_checkpoint(_params(runtime_seed, eval_seed=0), "ckpt", "x", torch.device("cpu"), torch.float32, tmp_path)
    checkpoint.evaluate_checkpoint(_params(0, eval_seed=7), "ckpt", "x", torch.device("cpu"), torch.float32, tmp_path)
    assert seen == [0, 0, 0, 7]
