"""Will it fit? Memory estimated from a checkpoint's headers before its weights load.

A stage that runs out of memory half-way has wasted its time and says nothing useful. The weights'
size comes from the safetensors headers, the activations from the model config, the batch and the
sequence length; the stage stops before loading when the sum exceeds what the device has free,
and names the batch size that would fit.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

HEADROOM = 0.9  # keep 10 % for the allocator's fragmentation and the framework itself


class InsufficientMemoryError(RuntimeError):
    """The requested model, batch and sequence length do not fit the device; the message says what would."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes of the parameters in the compute dtype
    per_sequence: int  # bytes of activations per sequence in the batch
    batch_size: int

    @property
    def total(self) -> int:
        return self.weights + self.per_sequence * self.batch_size


def checkpoint_parameters(path: str | Path) -> int:
    """Number of parameters in a checkpoint directory, from the safetensors headers alone."""
    count = 0
    for file in Path(path).glob("*.safetensors"):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                numel = 1
                for dim in info["shape"]:
                    numel *= dim
                count += numel
    return count


def capture_bytes_per_sequence(config: dict, dtype: torch.dtype, seq_len: int) -> int:
    """What the streaming capture holds per calibration sequence while the sequence's batch is in flight.

    Every layer boundary of every token in the compute dtype (for the all-pairs token cosine), and the
    last-token vector and mean feature of every boundary in fp32. The one pass that turns them into
    cosines works in chunks of 64 MiB, inside :data:`HEADROOM`.
    """
    hidden = config.get("hidden_size", 0)
    boundaries = config.get("num_hidden_layers", 0) + 1
    item = torch.tensor([], dtype=dtype).element_size()
    return boundaries * seq_len * hidden * item + 2 * boundaries * hidden * 4


def estimate(path: str | Path, dtype: torch.dtype, batch_size: int, seq_len: int, all_boundaries: bool = False) -> MemoryEstimate:
    """Memory for a forward pass of ``batch_size`` sequences of ``seq_len`` tokens through the checkpoint.

    Per sequence: a few hidden-size buffers per layer for the residual stream and attention, and the
    fp32 logits over the vocabulary. With ``all_boundaries`` (capture, and methods that re-capture),
    the larger of the logits and :func:`capture_bytes_per_sequence`: capture runs the decoder without
    the LM head, and the methods that also score the loss do so between captures, not during one.
    """
    config = json.loads((Path(path) / "config.json").read_text())
    hidden = config.get("hidden_size", 0)
    inter = config.get("intermediate_size") or config.get("ffn_dim") or 4 * hidden
    item = torch.tensor([], dtype=dtype).element_size()
    forward = item * (6 * hidden + 2 * inter) * seq_len
    logits = 4 * config.get("vocab_size", 0) * seq_len
    extra = max(logits, capture_bytes_per_sequence(config, dtype, seq_len)) if all_boundaries else logits
    return MemoryEstimate(checkpoint_parameters(path) * item, forward + extra, batch_size)


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the CUDA allocator's free bytes, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as handle:
            info = dict(line.split(":", 1) for line in handle)
        return int(info["MemAvailable"].split()[0]) * 1024


def guard(path: str | Path, device: torch.device, dtype: torch.dtype, batch_size: int, seq_len: int, setting: str, all_boundaries: bool = False) -> MemoryEstimate:
    """Raise :class:`InsufficientMemoryError` before loading when the estimate exceeds the free memory.

    ``setting`` is the params key of the batch size, named in the suggestion.
    """
    need = estimate(path, dtype, batch_size, seq_len, all_boundaries)
    have = int(available_bytes(device) * HEADROOM)
    if need.total <= have:
        return need
    gib = 1 << 30
    fits = (have - need.weights) // need.per_sequence if need.per_sequence else 0
    where = f"{device.type} ({have / gib:.1f} GiB usable)"
    if fits >= 1:
        advice = f"set {setting}={int(fits)} or lower (or a shorter sequence length)"
    else:
        advice = (
            "the weights alone leave no room for one sequence: use a device with more memory, a smaller "
            "runtime.dtype (bfloat16), or the layer-sequential execution mode where available"
        )
    raise InsufficientMemoryError(
        f"Estimated memory {need.total / gib:.1f} GiB (weights {need.weights / gib:.1f} GiB + {batch_size} x "
        f"{need.per_sequence / gib:.2f} GiB of activations for {seq_len} tokens) exceeds {where}: {advice}."
    )


def guard_source_load(num_parameters: int, copies: int = 2) -> None:
    """Refuse to load a model source whose float32 copies would not fit the host's available RAM.

    Sources are loaded in float32 on the CPU; a GGUF source briefly holds two copies (the dequantised
    load and the rebuilt plain model).
    """
    need = num_parameters * 4 * copies
    have = int(available_bytes(torch.device("cpu")) * HEADROOM)
    if need > have:
        gib = 1 << 30
        raise InsufficientMemoryError(
            f"Loading this model source needs about {need / gib:.1f} GiB of host RAM ({num_parameters / 1e9:.2f}B "
            f"parameters in float32, {copies} copies) but {have / gib:.1f} GiB is available: use a machine with "
            "more RAM, or convert the model to a safetensors checkpoint elsewhere and use model.source=local."
        )
