"""Layer-local distillation with the model never resident: the recover stage under ``hardware=sequential``.

A layer-local phase needs, for every trained student layer, the dense teacher's hidden state entering
its span of original layers (with the keyword arguments the teacher's decoder layer received there)
and the teacher's hidden state leaving the span. Resident, the engine hooks a whole teacher on every
batch (:class:`~layerfold.recovery.teacher.LiveTeacher`). Here nothing is ever whole:

1. **Teacher targets, once, layer by layer** (:class:`StoredTargets`). The training and validation
   blocks are embedded together and the base checkpoint's layers run over them one at a time
   (:class:`~layerfold.execution.LayerMajorRunner`, weights read per layer from the safetensors
   shards), up to the last span's end. Only the boundaries the spans need are kept (their starts and
   ends), on the device or in pinned host memory as ``hardware.activations`` says
   (:func:`~layerfold.execution.layer_major.choose_placement` over all kept boundaries, stored by
   :meth:`~layerfold.execution.Activations.store`): host RAM is O(stored boundaries) plus one layer.
   The blocks are unpadded fixed-length token blocks, so a layer's call arguments (causal mask, rotary
   ``position_embeddings``, positions) depend on the batch shape alone: they are recorded once per
   micro-batch size the engine will use, by the model's own forward (:func:`~layerfold.execution.probe_layer_calls`).
   A micro-batch's rows are then looked up, so the engine's data order, losses and optimiser steps are
   those of the resident run (trained weights equal to float32 rounding on the CPU).
2. **A partial student** (:func:`partial_student`): the compressed model's skeleton on the meta device
   with only the trained layers materialised (float32, on the device). The engine trains them with its
   one loop; LoRA wraps their linears as it does resident.
3. **The validation LM loss** before and after training (:class:`LayerMajorLMLoss`): the compressed
   stack with the trained layers swapped in, scored layer by layer
   (:func:`~layerfold.execution.token_nll`, the perplexity protocol's NLL).
4. **The recovered checkpoint, layer by layer** (:func:`save_recovered`): the trained layers (LoRA
   folded in) replace theirs, every other tensor streams from the compressed checkpoint's shards
   (:func:`~layerfold.execution.save_layerwise`).

End-to-end phases (LM loss, logit KD) need the whole student and stop in ``validate``
(:func:`layer_major_blocker`). One process only: every process would repeat the teacher pass.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from layerfold.execution.checkpoint import save_layerwise
from layerfold.execution.entry import Source, _setting, layer_loader, runner, token_nll
from layerfold.execution.layer_major import Activations, choose_placement, materialise_layer, probe_layer_calls
from layerfold.execution.loaders import LayerLoader, OverriddenLayerLoader, StateDict, meta_model
from layerfold.models.adapters import get_adapter
from layerfold.models.resources import HEADROOM, InsufficientMemoryError, available_bytes
from layerfold.recovery.distributed import launched_processes
from layerfold.recovery.engine import RecoveryEngine
from layerfold.recovery.errors import RecoveryConfigError
from layerfold.recovery.spans import Span, plan_spans, trainable_layers

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# What can run layer-major, checked before anything is loaded.
def layer_major_blocker(cfg: DictConfig) -> str | None:
    """Why ``recovery`` settings ``cfg`` cannot run with ``hardware=sequential``, or None when they can."""
    if cfg.name == "none":
        return None
    if cfg.end_to_end.enabled:
        return (f"recovery={cfg.name} has recovery.end_to_end.enabled=true (next-token LM loss / logit KD of the whole student), "
                "which needs the whole student and teacher resident")
    return None


def check_layer_major(cfg: DictConfig, processes: int = 1) -> None:
    """Raise :class:`RecoveryConfigError` for settings the layer-major recover stage cannot run."""
    why = layer_major_blocker(cfg)
    if why is not None:
        raise RecoveryConfigError(f"{why}; it cannot run with hardware=sequential. Use hardware=resident (`-S hardware=resident`), "
                                  "or a layer-local recovery (recovery=distill with recovery.end_to_end.enabled=false).")
    if processes > 1:
        raise RecoveryConfigError(
            f"hardware=sequential recovers on one process, but {processes} were launched (each would repeat the layer-major teacher "
            "pass). Start one process (`python -m pipeline.recover`), or use hardware=resident for several."
        )


# ---------------------------------------------------------------------------------------------------
class StoredTargets:
    """The teacher's span boundaries of every training and validation block, computed layer by layer once.

    Rows ``0 .. num_train - 1`` are the training blocks, then the validation blocks; ``kept[b]`` holds
    boundary ``b`` of every row in runner batches of ``batch_rows`` (on the device or in pinned host
    memory), ``calls[size][start]`` the keyword arguments of teacher layer ``start`` for a batch of
    ``size`` sequences.
    """

    def __init__(self, blocks: torch.Tensor, num_train: int, kept: dict[int, Activations], batch_rows: int,
                 calls: dict[int, dict[int, dict]], device: torch.device, execution: dict[str, Any]) -> None:
        self.blocks = blocks
        self.num_train = num_train
        self.kept = kept
        self.batch_rows = batch_rows
        self.calls = calls
        self.device = device
        self.execution = execution

    @classmethod
    @torch.no_grad()
    def compute(cls, source: Source, spans: list[Span], train: torch.Tensor, val: torch.Tensor, hardware: Any,
                device: torch.device | str, dtype: torch.dtype, batch_size: int) -> StoredTargets:
        """Run ``source`` (the dense base model) layer by layer over ``train`` and ``val`` up to the last span's end,
        keeping the boundaries ``spans`` start and end at; ``batch_size`` is the engine's micro-batch size (and the
        runner's, unless ``hardware.batch_size`` sets one)."""
        if not spans:
            raise ValueError("StoredTargets.compute needs at least one span to keep targets for.")
        device, loader = torch.device(device), layer_loader(source)
        blocks = torch.cat([train, val]).cpu()
        last = max(s.end for s in spans)
        if last > loader.num_layers:
            raise ValueError(f"A span ends at boundary {last}, beyond the dense model's {loader.num_layers} layers.")
        boundaries = sorted({s.start for s in spans} | {s.end for s in spans})
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_token = len(boundaries) * loader.config.hidden_size * itemsize
        stored_bytes = blocks.numel() * per_token
        placement = choose_placement(_setting(hardware, "activations", "auto"), device, stored_bytes,
                                     float(_setting(hardware, "activation_share", 0.5)))
        _check_room(stored_bytes, per_token, device if placement == "device" else torch.device("cpu"), blocks)
        run = runner(loader, hardware, device, dtype, batch_size)
        acts = run.embed(blocks)
        # input_ids and calls stay empty: the kept boundaries hold hidden states only.
        kept = {b: Activations(placement, device, boundary=b, input_ids=[], calls=[]) for b in boundaries}

        def keep(boundary: int, batch: int, hidden: torch.Tensor) -> None:
            if boundary in kept:  # boundary-major, batches in order: list position = batch index
                kept[boundary].hidden.append(kept[boundary].store(hidden))

        run.run_layers(acts, 0, last, on_boundary=keep)
        del acts  # the running boundary: only the kept ones stay
        starts = sorted({s.start for s in spans})
        calls = {size: _layer_kwargs(run.model, blocks[:size].to(device), starts) for size in _batch_sizes(train, val, batch_size)}
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # host placement: the copies into pinned memory are complete
        execution = {
            **run.report.as_dict(),
            "stored_boundaries": boundaries,
            "stored_activations": placement,
            "stored_mib": round(stored_bytes / 2**20, 1),
            "rows": {"train": int(train.shape[0]), "val": int(val.shape[0])},
        }
        log.info("teacher targets layer by layer: boundaries %s of %d blocks (%.1f MiB, %s), %d layers in %.1f s",
                 boundaries, blocks.shape[0], stored_bytes / 2**20, placement, run.report.layers_run, run.report.seconds)
        return cls(blocks, int(train.shape[0]), kept, run.batch_size, calls, device, execution)

    def fetch(self, split: str, rows: torch.Tensor, input_ids: torch.Tensor,
              spans: list[Span]) -> tuple[dict[int, tuple[torch.Tensor, dict]], dict[int, torch.Tensor]]:
        """The stored ``inputs[span.start]`` (with the layer's arguments) and ``outputs[span.end]`` of rows ``rows`` of ``split``."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} must be 'train' or 'val'.")
        positions = [int(r) + (0 if split == "train" else self.num_train) for r in rows.tolist()]
        if not torch.equal(self.blocks[positions], input_ids.cpu()):
            raise ValueError(f"The {split} rows {positions[:8]} do not hold the token ids the targets were computed for; "
                             "compute StoredTargets from the same training and validation blocks the engine trains on.")
        calls = self.calls.get(len(positions))
        if calls is None:
            raise ValueError(f"No layer arguments were recorded for a batch of {len(positions)} sequences (recorded: "
                             f"{sorted(self.calls)}); compute StoredTargets with the engine's recovery.batch_size.")
        inputs = {s.start: (self._gather(s.start, positions), calls[s.start]) for s in spans}
        outputs = {s.end: self._gather(s.end, positions) for s in spans}
        return inputs, outputs

    def teacher_flops_per_token(self, spans: list[Span]) -> float:
        return 0.0  # the teacher ran once, before training (its time is in ``execution``)

    def _gather(self, boundary: int, positions: list[int]) -> torch.Tensor:
        if boundary not in self.kept:
            raise KeyError(f"Boundary {boundary} was not stored (stored: {sorted(self.kept)}).")
        hidden = self.kept[boundary].hidden
        rows = torch.stack([hidden[p // self.batch_rows][p % self.batch_rows] for p in positions])
        return rows.to(self.device)


def _check_room(stored_bytes: int, per_token: int, where: torch.device, blocks: torch.Tensor) -> None:
    """Refuse, before any weight is read, targets that would not fit where they are to be kept."""
    have = int(available_bytes(where) * HEADROOM)
    if stored_bytes <= have:
        return
    gib = 1 << 30
    raise InsufficientMemoryError(
        f"The stored teacher targets need {stored_bytes / gib:.1f} GiB ({blocks.numel():,} training and validation tokens x "
        f"{per_token:,} bytes of span boundaries each) but {have / gib:.1f} GiB of {where.type} memory is usable: lower "
        f"recovery.data.train_tokens (about {have // per_token:,} tokens fit, validation included) or recovery.data.val_blocks"
        + (", or keep them in host memory (hardware.activations=host)." if where.type == "cuda" else ".")
    )


def _batch_sizes(train: torch.Tensor, val: torch.Tensor, batch_size: int) -> set[int]:
    """Every micro-batch size the engine uses: full batches and each split's short last one."""
    sizes = set()
    for rows in (train.shape[0], val.shape[0]):
        if rows:
            sizes.add(min(batch_size, rows))
            if rows % batch_size:
                sizes.add(rows % batch_size)
    return sizes


def _layer_kwargs(model: nn.Module, ids: torch.Tensor, layers: list[int]) -> dict[int, dict]:
    """The keyword arguments decoder layers ``layers`` receive for a batch shaped like ``ids``, from the model's own forward."""
    _, calls = probe_layer_calls(model, ids)
    found = {}
    for k in layers:
        if calls[k].args:
            raise RecoveryConfigError(f"The {model.config.model_type} forward passes positional arguments to its decoder layers; "
                                      "layer-local distillation replays keyword arguments only. Use hardware=resident.")
        found[k] = calls[k].kwargs
    return found


# ---------------------------------------------------------------------------------------------------
def partial_student(source: Source, layers: list[int], device: torch.device | str) -> nn.Module:
    """The model of ``source`` on the meta device with decoder ``layers`` materialised in float32 on ``device``
    (the master weights the engine trains; nothing else of the model takes memory)."""
    loader = layer_loader(source)
    model = meta_model(copy.deepcopy(loader.config))
    decoder = get_adapter(model).get_layers(model)
    for k in layers:
        decoder[k] = materialise_layer(decoder[k], loader.load_layer(k, device, torch.float32))
    return model.eval()


def layer_weights(layer: nn.Module) -> StateDict:
    """A decoder layer's tensors, keys relative to the layer; LoRA adapters (peft) folded into the weights
    they adapt (``W + delta``, as ``merge_and_unload`` writes them), so the layer reads as a plain one."""
    state = dict(layer.state_dict())
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft absent: no layer can carry adapters
        LoraLayer = ()
    for name, module in layer.named_modules():
        if isinstance(module, LoraLayer):
            key = f"{name}.base_layer.weight"
            for adapter in module.active_adapters:
                state[key] = state[key] + module.get_delta_weight(adapter)
    return {k.replace(".base_layer.", "."): v.detach() for k, v in state.items() if "lora_" not in k}


class LayerMajorLMLoss:
    """The engine's validation LM loss of a partial student: the compressed stack of ``compressed`` with the
    student's trained layers swapped in, run layer by layer over ``val``; mean next-token NLL."""

    def __init__(self, compressed: LayerLoader, layers: list[int], val: torch.Tensor, hardware: Any, device: torch.device | str,
                 dtype: torch.dtype, batch_size: int) -> None:
        self.compressed, self.layers, self.val = compressed, layers, val
        self.hardware, self.device, self.dtype, self.batch_size = hardware, torch.device(device), dtype, batch_size
        self.passes: list[dict[str, Any]] = []
        self.peak_gpu_mib: float | None = None  # the device peak before each pass reset it (token_nll resets the statistics)

    def __call__(self, model: nn.Module) -> float | None:
        if self.val.shape[0] == 0:
            return None
        if self.device.type == "cuda":
            self.peak_gpu_mib = max(self.peak_gpu_mib or 0.0, torch.cuda.max_memory_allocated(self.device) / 2**20)
        decoder = get_adapter(model).get_layers(model)
        trained = {k: layer_weights(decoder[k]) for k in self.layers}
        nll, count, report = token_nll(OverriddenLayerLoader(self.compressed, trained), self.val, self.hardware, self.device,
                                       self.dtype, self.batch_size)
        self.passes.append(report.as_dict())
        return nll / count


# ---------------------------------------------------------------------------------------------------
def layer_major_engine(base: Source, compressed: Source, plan: dict, cfg: DictConfig, train: torch.Tensor, val: torch.Tensor,
                       hardware: Any, device: torch.device | str, dtype: torch.dtype, **engine_kwargs: Any) -> RecoveryEngine:
    """A :class:`RecoveryEngine` for ``plan`` whose teacher is ``base`` and whose student is ``compressed``, neither of
    them ever whole: targets computed layer by layer (``dtype``, the teacher's compute dtype), trained layers only
    materialised. ``engine_kwargs`` go to the engine (``state_dir``, ``on_step``, ``on_log``, ``progress``)."""
    check_layer_major(cfg, launched_processes())
    compressed, base = layer_loader(compressed), layer_loader(base)
    spans = plan_spans(plan, compressed.num_layers, base.num_layers)
    layers = trainable_layers(spans, cfg.trainable)
    if not layers:  # nothing to train: the engine raises its own error, before any teacher pass
        return RecoveryEngine(partial_student(compressed, [], device), None, plan, cfg, train, val, **engine_kwargs)
    targets = StoredTargets.compute(base, [spans[k] for k in layers], train, val, hardware, device, dtype, cfg.batch_size)
    student = partial_student(compressed, layers, device)
    lm_loss = LayerMajorLMLoss(compressed, layers, val, hardware, device, dtype, cfg.batch_size)
    return RecoveryEngine(student, None, plan, cfg, train, val, targets=targets, lm_loss=lm_loss, **engine_kwargs)


def execution_report(engine: RecoveryEngine) -> dict[str, Any]:
    """What the layer-major parts of a run cost: the teacher pass and the LM-loss passes (for ``metrics/recover.json``)."""
    report: dict[str, Any] = {"mode": "sequential" if engine.partial else "resident"}
    if isinstance(engine.targets, StoredTargets):
        report["teacher_targets"] = engine.targets.execution
    if isinstance(engine.lm_loss, LayerMajorLMLoss):
        report["lm_loss_passes"] = engine.lm_loss.passes
    return report


def save_recovered(model: nn.Module, layers: list[int], compressed: Source, tokenizer: PreTrainedTokenizerBase, path: str | Path,
                   storage_dtype: torch.dtype, *, generation_config: GenerationConfig | None = None, plan: dict | None = None,
                   extra_json: dict[str, dict] | None = None) -> None:
    """Write the recovered checkpoint layer by layer: ``model``'s trained ``layers`` (LoRA folded in) replace the
    compressed checkpoint's, every other tensor streams from it; float32 through ``storage_dtype`` as the resident save.
    ``plan`` is written as ``plan.json``, sealed to the written files, in the same atomic rename."""
    decoder = get_adapter(model).get_layers(model)
    trained = {k: {name: t.cpu() for name, t in layer_weights(decoder[k]).items()} for k in layers}
    save_layerwise(OverriddenLayerLoader(layer_loader(compressed), trained), tokenizer, path, torch.float32, storage_dtype,
                   generation_config=generation_config, plan=plan, extra_json=extra_json)
