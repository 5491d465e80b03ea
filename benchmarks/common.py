"""What every benchmark shares: honest timing, the paper-scale model shapes, device facts, and one
JSON record layout, so ``benchmarks/run.py`` can collect any script's result into one table.

Timing rules (applied by :func:`timed` and :func:`alternate`, re-exported from
:mod:`layerfold.runtime`): warm up first (3 rounds by default), synchronise the device
around each run, repeat (10 by default), and report the median with the spread; variants that are
compared run interleaved in one process (``alternate``), so drift (clocks, caches, a noisy neighbour)
hits them alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from layerfold.io import portable_path
from layerfold.models.devices import device_name, host_peak_rss_mib, library_versions, mfu
from layerfold.runtime import Timing, Workload, alternate, synchronize, timed  # noqa: F401 (re-exported)

# Real configurations of the paper-scale models (published config.json values). Random weights of these
# shapes give real time and memory, never accuracy.
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    # small shape for CPU smoke runs of the same scripts
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def llama_config(shape: str, **overrides: Any) -> Any:
    """A ``LlamaConfig`` of one of :data:`SHAPES` (``overrides`` e.g. ``num_hidden_layers=4``)."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise KeyError(f"Unknown shape {shape!r}; choose one of {sorted(SHAPES)}.")
    return LlamaConfig(**{**SHAPES[shape], **overrides})


# The timing primitive lives in the library (the evaluate stage times with it too); these are its names here.
sync = synchronize


def reset_peak_gpu(device: torch.device | str | None) -> None:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_mib(device: torch.device | str | None) -> float | None:
    """Peak allocated accelerator memory since the last reset; None off-GPU."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def peak_host_mib() -> float:
    """The process's peak resident set size: a high-water mark that cannot be reset."""
    return round(host_peak_rss_mib(), 1)


def device_mfu(flops: float, seconds: float, device: torch.device | str) -> float | None:
    """MFU of ``flops`` done in ``seconds`` on ``device`` against its dense bf16 peak (None if unknown)."""
    return mfu(flops, seconds, device_name(device))


def forward_flops(num_params_no_embed: int, tokens: int, num_layers: int = 0, hidden: int = 0, seq_len: int = 0,
                  vocab: int = 0, logits_tokens: int | None = None) -> float:
    """Forward FLOPs: 2 per weight per token, plus causal attention scores (2 * 2 * L * T * S/2 * hidden per
    sequence) and the LM head on the positions whose logits are computed (``logits_tokens``, default all)."""
    attention = 2 * num_layers * tokens * seq_len * hidden if seq_len else 0  # QK^T and AV, causal half
    head = 2 * hidden * vocab * (tokens if logits_tokens is None else logits_tokens)
    return 2 * num_params_no_embed * tokens + attention + head


def command_line() -> str:
    """This process's command as results record it: paths relative to the repository, none of this machine's."""
    return " ".join(portable_path(arg) if arg.startswith("/") else arg for arg in sys.argv)


def add_layer_major_args(parser: Any, name: str, dtype_help: str = "auto: bf16 on CUDA, fp32 on CPU") -> None:
    """The options every layer-by-layer benchmark shares: where activations live, prefetch, seed, device,
    dtype and the result file (default ``benchmarks/results/<name>_<device type>.json``)."""
    parser.add_argument("--activations", default="auto", choices=["auto", "device", "host"])
    parser.add_argument("--no-prefetch", action="store_true", help="load each layer only when it is needed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help=dtype_help)
    parser.add_argument("--out", type=Path, help=f"result JSON (default benchmarks/results/{name}_<device type>.json)")


def environment(device: torch.device | str) -> dict[str, Any]:
    """Where and when a result was measured."""
    return {
        "date": _dt.date.today().isoformat(),
        "device": device_name(device),
        **library_versions(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }


def row(name: str, *, timing: Timing | None = None, tokens: int | None = None, flops: float | None = None,
        device: torch.device | str = "cpu", weights_mib: float | None = None, target: str | None = None,
        met: bool | None = None, **extra: Any) -> dict[str, Any]:
    """One line of a benchmark table in the layout ``benchmarks/run.py`` collects: seconds (median and
    spread), tokens/s, MFU, peak GPU memory (also as a multiple of the weights) and peak host RAM."""
    gpu = peak_gpu_mib(device)
    out: dict[str, Any] = {"name": name}
    if timing is not None:
        out.update(seconds=round(timing.median, 4), seconds_min=round(min(timing.runs), 4),
                   seconds_max=round(max(timing.runs), 4), repeats=len(timing.runs))
    if tokens is not None:
        out["tokens"] = tokens
        if timing is not None:
            out["tokens_per_s"] = round(tokens / timing.median, 1)
    if flops is not None and timing is not None:
        out["mfu"] = device_mfu(flops, timing.median, device)
    out["peak_gpu_mib"] = gpu
    if gpu is not None and weights_mib:
        out["peak_gpu_over_weights"] = round(gpu / weights_mib, 3)
    out["peak_host_mib"] = peak_host_mib()
    if target is not None:
        out.update(target=target, met=met)
    out.update(extra)
    return out


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it: results carry no host paths."""
    repo = Path(__file__).resolve().parents[1]
    path = path.resolve()
    return str(path.relative_to(repo)) if path.is_relative_to(repo) else str(path)


def write_result(path: Path | str, record: dict[str, Any]) -> None:
    """Write a benchmark record atomically (temp file + rename) and echo it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(json.dumps(record, indent=2)[:4000])
