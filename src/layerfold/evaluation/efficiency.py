"""Measured efficiency: parameter counts, prefill latency, decode throughput and peak memory."""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch
from transformers import PreTrainedModel

from layerfold.models.sources import describe


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory since the last reset, or the process's max RSS on CPU.

    ru_maxrss (KiB on Linux) is the process high-water mark: it includes everything loaded so far and
    cannot be reset, so on CPU it bounds the step from above rather than isolating it.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_kind(device: torch.device) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS"


@torch.no_grad()
def measure_efficiency(model: PreTrainedModel, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3, seed: int = 0) -> dict:
    """Time prefill of ``batch_size x prompt_len`` random tokens and greedy decoding of ``new_tokens``."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, model.config.vocab_size, (batch_size, prompt_len), generator=generator).to(device)
    reset_peak_memory(device)

    model(input_ids=prompt, use_cache=False)  # warm-up: kernels, allocator
    prefill = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model(input_ids=prompt, use_cache=False)
        _sync(device)
        prefill.append(time.perf_counter() - start)

    decode = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        _sync(device)
        decode.append(time.perf_counter() - start)
    prefill_s = statistics.median(prefill)
    # generate() includes one prefill; subtract it so the rate is decode-only.
    decode_s = max(statistics.median(decode) - prefill_s, 1e-9)

    result = {
        **{k: v for k, v in describe(model).items() if k in ("num_layers", "params_total")},
        "device": device_name(device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_latency_ms": prefill_s * 1000,
        "decode_tokens_per_s": batch_size * new_tokens / decode_s,
    }
    result["peak_memory_mib"] = peak_memory_mib(device)
    result["peak_memory_kind"] = peak_memory_kind(device)
    return result
