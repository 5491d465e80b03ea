"""Perplexity of a checkpoint, resident or layer by layer as ``hardware.mode`` says.

The protocol is :mod:`layerfold.evaluation.perplexity`'s (same windows, same record). ``resident`` loads the
whole model and scores it batch by batch; ``sequential`` scores the same windows through
:func:`layerfold.execution.token_nll`, the model read one layer at a time, so a stage calls :func:`perplexity`
and never branches on the hardware itself. A ``source`` is what :mod:`layerfold.execution.entry` takes: a
checkpoint directory, a :class:`~layerfold.execution.LayerLoader` or an HF model already in memory.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from layerfold.evaluation.perplexity import perplexity as resident_perplexity
from layerfold.evaluation.perplexity import perplexity_result, perplexity_windows
from layerfold.execution.entry import Source, hardware_mode, reset_peak_memory, resident_model, resident_report, token_nll


def perplexity(source: Source, tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, hardware: Any,
               max_windows: int | None = None, add_bos: bool = False, batch_size: int = 1,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """:func:`layerfold.evaluation.perplexity.perplexity` of ``source`` (same windows, same dict), plus ``execution``: what it cost."""
    device = torch.device(device)
    if hardware_mode(hardware) == "resident":
        reset_peak_memory(device)
        began = time.perf_counter()
        result = resident_perplexity(resident_model(source, device, dtype), tokenizer, text, seq_len, max_windows, add_bos, batch_size, desc="perplexity")
        return {**result, "execution": resident_report(device, began).as_dict()}
    blocks, tokens_in_text = perplexity_windows(tokenizer, text, seq_len, max_windows, add_bos)
    nll, count, report = token_nll(source, blocks, hardware, device, dtype, batch_size)
    return {**perplexity_result(nll, count, blocks, tokens_in_text, add_bos), "execution": report.as_dict()}
