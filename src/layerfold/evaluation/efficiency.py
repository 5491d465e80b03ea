"""Measured efficiency: prefill latency, decode throughput and peak memory, and the timing rules that
make a speed-up between two models mean something.

A speed-up from removing layers cannot exceed the ratio of the work per token: removing 8 of 30
layers leaves the embedding lookup and the LM head as they were, so dense / compressed forward FLOPs
is at most 30 / 22. A measurement above that bound measured something else, and the usual culprits
are in how it was timed:

- too little warm-up (CUDA context, cuBLAS handles, allocator, clocks still ramping up) and too few
  repeats to see the spread;
- dense and compressed timed one after the other or in different processes, so clock state, caches
  and other load differ between them: here variants run round-robin in one process
  (:func:`layerfold.runtime.alternate`);
- a prefill so small that per-forward fixed costs (kernel launches, Python per layer) dominate: the
  record carries a single-token forward's time next to the prefill's, which shows how much of it is
  fixed cost;
- ``generate()`` timed as decode (it includes a prefill and the sampling logic): decode here is a loop
  of single-token forwards on the KV cache, after an untimed prefill;
- prefill computing logits for every position (a batch x prompt x vocabulary tensor that inflates
  both time and memory): prefill keeps the last position's logits only (``logits_to_keep=1``).

Every speed-up is reported with its range over the repeats and with :func:`forward_flops_per_token`'s
bound; ``measurement_suspect`` is set when even the least favourable pairing of runs beats the bound.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import PreTrainedModel

from layerfold.models.adapters import get_adapter
from layerfold.models.devices import device_name, host_peak_rss_mib
from layerfold.models.sources import describe
from layerfold.runtime import Clock, Timing, Workload, alternate, synchronize, weights_mib

# ------------------------------------------------------------------------------------------------
# the bound: forward FLOPs per token


def forward_flops_per_token(model: PreTrainedModel, context: float, logits_fraction: float = 1.0) -> float:
    """Forward FLOPs per token: 2 per weight of every decoder layer, 4 x attention width x ``context``
    per layer for the attention scores and their weighted sum, and the LM head (2 x hidden x vocab)
    on the ``logits_fraction`` of positions whose logits are computed. The embedding lookup is free.

    Counted from the modules themselves, so merged, concatenated and replacement layers count as what
    they are. Prefill of T tokens with ``logits_to_keep=1``: ``context=(T + 1) / 2``,
    ``logits_fraction=1 / T``; a decode step at cache length c: ``context=c + 1``, ``logits_fraction=1``.
    """
    adapter = get_adapter(model)
    flops = 0.0
    for layer in adapter.get_layers(model):
        flops += 2 * sum(p.numel() for p in layer.parameters())
        flops += 4 * _attention_width(layer, adapter, model.config) * context
    head = model.get_output_embeddings()
    if head is not None:
        flops += 2 * head.weight.numel() * logits_fraction
    return flops


def _attention_width(layer: torch.nn.Module, adapter, config) -> int:
    """Query heads x head dimension of one layer (layers of a concatenation merge can differ)."""
    if adapter.head_projections is not None:
        return layer.get_submodule(adapter.head_projections[0]).weight.shape[0]
    return config.hidden_size


def speedup_check(reference: tuple[float, float, float], candidate: tuple[float, float, float], bound: float | None) -> dict[str, Any]:
    """Speed-up of ``candidate`` over ``reference`` from their ``(median, min, max)`` times per unit of
    work, its range over the repeats (least and most favourable pairing of runs), the FLOP ``bound``,
    and ``measurement_suspect``: even the least favourable pairing beats the bound, i.e. the speed-up
    exceeds the bound by more than its own spread."""
    (ref_median, ref_min, ref_max), (cand_median, cand_min, cand_max) = reference, candidate
    low = ref_min / cand_max
    return {
        "speedup": round(ref_median / cand_median, 4),
        "speedup_min": round(low, 4),
        "speedup_max": round(ref_max / cand_min, 4),
        "speedup_bound": None if bound is None else round(bound, 4),
        "measurement_suspect": bool(bound is not None and low > bound),
    }


# ------------------------------------------------------------------------------------------------
# the measurement


def _check_settings(**values: int) -> None:
    """Clear errors for settings that cannot be measured (the config schema checks the pipeline's)."""
    minimum = {"batch_size": 1, "prompt_len": 1, "new_tokens": 1, "repeats": 1, "warmup": 0}
    for key, value in values.items():
        if value < minimum[key]:
            raise ValueError(f"{key}={value} is below {minimum[key]}; set eval.efficiency.{key} (or the argument) to {minimum[key]} or more.")


def _keeps_last_logits(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _last_logits_forward(model: PreTrainedModel) -> Callable[..., Any]:
    """``model(input_ids=..., **kwargs)`` computing the last position's logits only where the model
    can (decided once here: inspecting the signature inside a timed run would add to its time)."""
    keep = {"logits_to_keep": 1} if _keeps_last_logits(model) else {}
    return lambda input_ids, **kwargs: model(input_ids=input_ids, **keep, **kwargs)


def _prefill(model: PreTrainedModel, prompt: torch.Tensor) -> Workload:
    forward = _last_logits_forward(model)
    return Workload(run=lambda _: forward(prompt, use_cache=False))


def _single_token(model: PreTrainedModel, prompt: torch.Tensor) -> Workload:
    """A forward of one token per sequence: the fixed cost every forward pays whatever its length."""
    forward, first = _last_logits_forward(model), prompt[:, :1].contiguous()
    return Workload(run=lambda _: forward(first, use_cache=False))


def _decode(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int) -> Workload:
    """``new_tokens`` greedy single-token forwards on the KV cache that an untimed prefill filled."""
    forward = _last_logits_forward(model)
    # transformers 5.2x names the KV cache `cache` (argument and output) and warns on `past_key_values`; earlier
    # releases know only `past_key_values`
    argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(out: Any) -> Any:
        return out["cache"] if "cache" in out.keys() else out["past_key_values"]

    def prepare() -> tuple[Any, torch.Tensor]:
        out = forward(prompt, use_cache=True)
        return cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)

    def run(state: tuple[Any, torch.Tensor]) -> None:
        cache, token = state
        for _ in range(new_tokens):
            out = forward(token, **{argument: cache}, use_cache=True)
            cache, token = cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)

    return Workload(run=run, prepare=prepare)


def _generation_memory(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, device: torch.device, shared: bool) -> dict[str, Any]:
    """Peak memory of one prefill + decode with the KV cache, the peak statistics reset right before.

    On CUDA the peak is taken above what was allocated before the run (other models in the process
    included) and added to this model's own weights, so it is what this model alone needs.
    """
    decode = _decode(model, prompt, new_tokens)
    if device.type != "cuda":
        decode.run(decode.prepare())
        kind = "process max RSS" + (" (one process for all models compared: not per model)" if shared else "")
        return {"peak_memory_mib": round(host_peak_rss_mib(), 1), "peak_memory_kind": kind}
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    decode.run(decode.prepare())
    synchronize(device)
    extra = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return {
        "peak_memory_mib": round(weights_mib(model) + extra, 1),
        "peak_memory_kind": "cuda max_memory_allocated during prefill + decode: weights + peak above them",
        "generation_extra_mib": round(extra, 1),
    }


@torch.inference_mode()
def compare_efficiency(models: Mapping[str, PreTrainedModel], *, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 32,
                       warmup: int = 3, repeats: int = 10, seed: int = 0, min_warmup_s: float = 0.0,
                       clock: Clock = time.perf_counter) -> dict[str, Any]:
    """Measure several models on one device in this process, alternating them round-robin.

    Returns ``{"settings", "models": {name: record}, "speedups": {name: {"prefill", "decode"}}}``;
    speed-ups are against the first model, each with its range, its FLOP bound and
    ``measurement_suspect`` (:func:`speedup_check`). All models see the same random prompt.
    """
    _check_settings(batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, warmup=warmup)
    if not models:
        raise ValueError("compare_efficiency needs at least one model.")
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    for name, model in models.items():
        if next(model.parameters()).device != device or model.config.vocab_size != first.config.vocab_size:
            raise ValueError(f"Model '{name}' is on {next(model.parameters()).device} with vocabulary {model.config.vocab_size}; "
                             f"every compared model must be on {device} with vocabulary {first.config.vocab_size}.")
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, first.config.vocab_size, (batch_size, prompt_len), generator=generator).to(device)

    workloads = {}
    for name, model in models.items():
        workloads[("prefill", name)] = _prefill(model, prompt)
        workloads[("single_token", name)] = _single_token(model, prompt)
    forward_times = alternate(workloads, device, warmup, repeats, min_warmup_s, clock)
    decode_times = alternate({name: _decode(model, prompt, new_tokens) for name, model in models.items()},
                             device, warmup, repeats, min_warmup_s, clock)

    prefill_context, decode_context = (prompt_len + 1) / 2, prompt_len + (new_tokens + 1) / 2
    records = {}
    for name, model in models.items():
        prefill, single, decode = forward_times[("prefill", name)], forward_times[("single_token", name)], decode_times[name]
        per_token = [t / new_tokens for t in decode.runs]
        records[name] = {
            **{k: v for k, v in describe(model).items() if k in ("num_layers", "params_total")},
            "device": device_name(device),
            "dtype": str(model.dtype).replace("torch.", ""),
            "batch_size": batch_size,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "warmup": warmup,
            "repeats": repeats,
            "prefill_latency_ms": round(prefill.median * 1000, 4),
            "prefill_latency_ms_range": [round(prefill.min * 1000, 4), round(prefill.max * 1000, 4)],
            "prefill_logits": "last position" if _keeps_last_logits(model) else "every position",
            # how much of the prefill a one-token forward already costs: near 1, the prefill is fixed
            # cost (launches, Python per layer), not work, and speed-ups follow the layer count
            "single_token_forward_ms": round(single.median * 1000, 4),
            "decode_tokens_per_s": round(batch_size * new_tokens / decode.median, 2),
            "decode_ms_per_token": round(statistics.median(per_token) * 1000, 4),
            "decode_ms_per_token_range": [round(min(per_token) * 1000, 4), round(max(per_token) * 1000, 4)],
            "decode_timing": "single-token forwards on the KV cache after an untimed prefill, greedy",
            "flops_per_token": {
                "prefill": forward_flops_per_token(model, prefill_context, 1 / prompt_len if _keeps_last_logits(model) else 1.0),
                "decode": forward_flops_per_token(model, decode_context, 1.0),
            },
            "runs_ms": {"prefill": _ms(prefill), "single_token": _ms(single), "decode": _ms(decode)},
            "weights_mib": round(weights_mib(model), 1),
            **_generation_memory(model, prompt, new_tokens, device, shared=len(models) > 1),
        }

    reference = next(iter(models))
    ref = records[reference]
    speedups = {}
    for name in list(models)[1:]:
        rec = records[name]
        speedups[name] = {"reference": reference, **{
            phase: speedup_check(timing_of(ref), timing_of(rec), ref["flops_per_token"][phase] / rec["flops_per_token"][phase])
            for phase, timing_of in (("prefill", _prefill_ms), ("decode", _decode_ms))
        }}
    settings = {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "warmup": warmup,
                "repeats": repeats, "min_warmup_s": min_warmup_s, "seed": seed, "device": device_name(device),
                "order": "round-robin in one process, starting variant rotated every round"}
    return {"settings": settings, "models": records, "speedups": speedups}


def _ms(timing: Timing) -> list[float]:
    return [round(run * 1000, 4) for run in timing.runs]


def _prefill_ms(record: Mapping[str, Any]) -> tuple[float, float, float]:
    return (record["prefill_latency_ms"], *record["prefill_latency_ms_range"])


def _decode_ms(record: Mapping[str, Any]) -> tuple[float, float, float]:
    return (record["decode_ms_per_token"], *record["decode_ms_per_token_range"])


def efficiency_speedups(reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Prefill and decode speed-ups of two recorded efficiency blocks (see :func:`compare_efficiency`),
    ``None`` for a phase whose median, range or FLOPs either record lacks (older metrics files)."""
    out: dict[str, dict[str, Any] | None] = {}
    for phase, timing_of in (("prefill", _prefill_ms), ("decode", _decode_ms)):
        try:
            ref, cand = timing_of(reference), timing_of(candidate)
        except (KeyError, TypeError):
            out[phase] = None
            continue
        ref_flops = (reference.get("flops_per_token") or {}).get(phase)
        cand_flops = (candidate.get("flops_per_token") or {}).get(phase)
        out[phase] = speedup_check(ref, cand, ref_flops / cand_flops if ref_flops and cand_flops else None)
    return out


def measure_efficiency(model: PreTrainedModel, *, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 32,
                       warmup: int = 3, repeats: int = 10, seed: int = 0, min_warmup_s: float = 0.0) -> dict[str, Any]:
    """Prefill latency (``batch_size x prompt_len`` random tokens, last position's logits), decode
    throughput (``new_tokens`` single-token steps on the KV cache) and peak memory of one model.

    Numbers of two models measured by separate calls (e.g. two ``evaluate`` stages) are not a paired
    comparison; :func:`compare_efficiency` is.
    """
    result = compare_efficiency({"model": model}, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
                                warmup=warmup, repeats=repeats, seed=seed, min_warmup_s=min_warmup_s)
    return result["models"]["model"]
