"""ShortGPT (icip-cas/ShortGPT): the official class, fed the calibration blocks one per call (its run script's batch 1)."""

from __future__ import annotations

import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from parity.compare import same_sequence, tensor_differences, value_differences
from parity.released import released_path
from parity.runner import Outcome, Preloaded, Settings, cuda_calls_to, load_model, load_module, measure, patched, released_imports, state_of


class BlockTokenizer:
    """Stands in for ShortGPT's tokenizer: a "prompt" is already a token block; returns it as the
    padded batch the real tokenizer would (no padding needed: every block has the same length)."""

    def __init__(self, eos_token: str | None) -> None:
        self.eos_token = eos_token
        self.pad_token = eos_token

    def __call__(self, prompts: Sequence[torch.Tensor], **kwargs: Any) -> types.SimpleNamespace:
        ids = torch.stack(list(prompts))
        return types.SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


def released_shortgpt(settings: Settings, blocks: torch.Tensor) -> Outcome:
    root = released_path(Path(settings.released_dir), "shortgpt") / "shortgpt"
    device = torch.device(settings.device)
    model, tokenizer = load_model(settings)
    with released_imports(root, ["shortgpt", "metrics"]):
        module = load_module(root / "shortgpt.py", "shortgpt")
    with patched(module, AutoTokenizer=Preloaded(BlockTokenizer(tokenizer.eos_token)), AutoModelForCausalLM=Preloaded(model)):
        short = module.ShortGPT(model_name=settings.checkpoint, layers_path="model.layers", n_prune_layers=settings.num_remove)

    def run() -> list[int]:
        with cuda_calls_to(device):
            for block in blocks:  # run_shortgpt.py: DataLoader(batch_size=1), eval_importance per document
                short.eval_importance(prompts=[block], stride=blocks.shape[1], max_gen_len=0)
        removed = short.remove_layers()
        for layer_idx, module_ in enumerate(short.layers):  # run_shortgpt.py, after remove_layers()
            module_.self_attn.layer_idx = layer_idx
        return removed

    removed, measurement = measure(run, model, blocks[:1], device)
    record = {"importances_sum": [float(v) for v in short.importances], "tokens": int(blocks.numel()), "removed": sorted(removed)}
    return Outcome(record, state_of(model), measurement)


def compare_shortgpt(out: dict[str, Outcome], tolerance: float) -> list[dict]:
    rel, lf = out["released"].record, out["layerfold"].record["plan"]["details"]
    official = [v / rel["tokens"] for v in rel["importances_sum"]]  # sum over tokens -> mean, layerfold's scale
    ours = lf["block_influence"]
    return [
        value_differences("block_influence", "BI of layers 0..L-2 (sum over tokens / tokens)", official[:-1], ours[:-1], 1e-4),
        value_differences("block_influence_last_layer",
                          "BI of the last layer: official compares with HF's post-norm hidden_states[-1], layerfold with the "
                          "pre-norm residual stream (documented in methods/shortgpt.py)", official[-1:], ours[-1:], 1e-4, gate=False),
        same_sequence("removed_layers", "layers removed", rel["removed"], lf["removed_layers"]),
        tensor_differences(out["released"].state, out["layerfold"].state, tolerance),
    ]
