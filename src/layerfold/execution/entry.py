"""One entry point per consumer, resident or layer-major as ``hardware.mode`` says.

``resident`` loads the whole model on the device and runs it batch by batch (the way every stage has
run so far); ``sequential`` runs it layer by layer through :class:`LayerMajorRunner`, with the
weights read per layer. Both feed the same consumers, so a stage calls these functions and never
branches on the hardware itself:

- :func:`capture_statistics`: every layer boundary into :meth:`BoundaryStatistics.add`;
- :func:`token_nll`: summed next-token NLL over token blocks (perplexity under the evaluation protocol
  is :func:`layerfold.evaluation.perplexity_layerwise.perplexity`, built on it).

A ``source`` is a checkpoint directory, a :class:`~layerfold.execution.LayerLoader` (e.g. a
:class:`~layerfold.execution.PlannedLayerLoader` of a plan never written as a checkpoint), or an HF
model already in memory. ``hardware`` is the ``hardware`` config section (:class:`layerfold.config.HardwareConfig`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerfold.capture.stats import BoundaryStatistics
from layerfold.capture.stats import capture_statistics as resident_capture
from layerfold.execution.layer_major import ExecutionReport, LayerMajorRunner, materialise_model
from layerfold.execution.loaders import LayerLoader, ModelLayerLoader, SafetensorsLayerLoader
from layerfold.execution.loss import token_nll as resident_token_nll
from layerfold.execution.nll import TokenNLL
from layerfold.models.adapters import get_adapter
from layerfold.models.devices import host_peak_rss_mib
from layerfold.models.sources import load_checkpoint

Source = str | Path | LayerLoader | nn.Module
MODES = ("resident", "sequential")


def _setting(hardware: Any, key: str, default: Any = None) -> Any:
    value = hardware.get(key, default) if hasattr(hardware, "get") else getattr(hardware, key, default)
    return default if value is None else value


def hardware_mode(hardware: Any) -> str:
    """``hardware.mode`` (``resident`` by default), checked against :data:`MODES`."""
    mode = _setting(hardware, "mode", "resident")
    if mode not in MODES:
        raise ValueError(f"hardware.mode={mode!r} is not allowed: it must be one of {', '.join(MODES)}. Pick a group with `-S hardware=sequential`.")
    return mode


def resident_model(source: Source, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The whole model of ``source`` on ``device``."""
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, (str, Path)):
        return load_checkpoint(source, device, dtype)[0]
    return materialise_model(source, device, dtype).eval()


def layer_loader(source: Source) -> LayerLoader:
    """A per-layer loader of ``source``."""
    if isinstance(source, (str, Path)):
        return SafetensorsLayerLoader(source)
    if isinstance(source, nn.Module):
        return ModelLayerLoader(source)
    return source


def runner(source: Source, hardware: Any, device: torch.device | str, dtype: torch.dtype, batch_size: int) -> LayerMajorRunner:
    """A :class:`LayerMajorRunner` over ``source`` with the ``hardware`` settings (``hardware.batch_size`` null: ``batch_size``)."""
    return LayerMajorRunner(
        layer_loader(source), device, dtype,
        activations=_setting(hardware, "activations", "auto"),
        prefetch=bool(_setting(hardware, "prefetch", False)),
        batch_size=int(_setting(hardware, "batch_size", batch_size)),
        activation_share=float(_setting(hardware, "activation_share", 0.5)),
    )


def reset_peak_memory(device: torch.device) -> None:
    """Start the device's peak-memory count afresh (CUDA; nothing elsewhere), so a report measures one run."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def resident_report(device: torch.device, began: float) -> ExecutionReport:
    """What a resident run that began at ``began`` (``time.perf_counter``) cost: seconds, peak device and host memory."""
    gpu = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    return ExecutionReport(mode="resident", activations="device", seconds=time.perf_counter() - began,
                           peak_gpu_mib=gpu, peak_host_mib=round(host_peak_rss_mib(), 1))


@torch.no_grad()
def capture_statistics(source: Source, blocks: torch.Tensor, hardware: Any, stats: BoundaryStatistics,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 4) -> ExecutionReport:
    """Feed every layer boundary of ``blocks`` ``[n, seq]`` into ``stats``; return what the run cost.

    Resident: batch-major, hooks on the decoder layers (only the decoder runs, no LM head), as
    :func:`layerfold.capture.capture_statistics`. Sequential: boundary-major. Batch ids are the batch
    positions in ``blocks`` either way, so ``stats`` ends up with the same sums (and sample order).

    Boundary-major, every batch is open at once, so ``stats`` holds ``2 * max_distance + 1`` boundaries
    of *all* sequences (all ``L + 1`` with ``max_distance=None``; one, the previous, with
    ``max_distance=1``): give large models a ``max_distance`` (1 is enough for Block Influence, ``n``
    for windows of ``n`` layers).
    """
    device = torch.device(device)
    reset_peak_memory(device)
    began = time.perf_counter()
    if hardware_mode(hardware) == "resident":
        model = resident_model(source, device, dtype)
        _check_boundaries(stats, get_adapter(model).num_layers(model))
        resident_capture(model, blocks, batch_size, desc="capture", stats=stats)
        return resident_report(device, began)
    run = runner(source, hardware, device, dtype, batch_size)
    _check_boundaries(stats, run.num_layers)
    acts = run.embed(blocks)
    run.run_layers(acts, on_boundary=stats.add)
    stats.synchronize()  # the sums to the host; a non-finite boundary fails here
    return run.report


def _check_boundaries(stats: BoundaryStatistics, num_layers: int) -> None:
    if stats.num_boundaries != num_layers + 1:
        raise ValueError(
            f"The statistics were made for {stats.num_boundaries} boundaries but the model has {num_layers} layers "
            f"({num_layers + 1} boundaries); create them with BoundaryStatistics({num_layers + 1}, ...)."
        )


@torch.no_grad()
def token_nll(source: Source, blocks: torch.Tensor, hardware: Any, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, batch_size: int = 1) -> tuple[float, int, ExecutionReport]:
    """Summed next-token NLL over ``blocks`` ``[n, seq]``, the number of predicted tokens, and what the run cost."""
    device = torch.device(device)
    reset_peak_memory(device)
    began = time.perf_counter()
    if hardware_mode(hardware) == "resident":
        total, count = resident_token_nll(resident_model(source, device, dtype), blocks, batch_size)
        return total, count, resident_report(device, began)
    run = runner(source, hardware, device, dtype, batch_size)
    acts = run.embed(blocks)
    head = TokenNLL(run.final_norm(), run.lm_head(), acts, run.num_layers, int(_setting(hardware, "logits_chunk", 1024)))
    run.run_layers(acts, on_boundary=head)
    return head.nll, head.count, run.report

