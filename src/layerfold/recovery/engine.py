"""The recovery engine: one training loop for every method, driven by ``plan.json``.

A run is a list of *phases*, each one pass of the same loop (optimiser and schedule stepped per optimiser step,
gradient accumulation, clipping, bf16 autocast on CUDA):

- ``local``: layer-local distillation. Each trained student layer is called with the teacher's hidden state
  entering its span and the layer arguments the teacher's decoder layer received there, exactly as inside the
  full model (:mod:`layerfold.recovery.local`), and fits the teacher's state leaving the span. Where those
  targets come from is pluggable (``targets``, a :class:`~layerfold.recovery.teacher.SpanTargets`): a hooked
  resident teacher (:class:`~layerfold.recovery.teacher.LiveTeacher`) or the boundaries computed once layer by
  layer (:class:`~layerfold.recovery.layer_major.StoredTargets`, ``hardware=sequential``). Layers train jointly on
  one teacher pass (``order: joint``) or one after another (``order: sequential``, a phase each).
- ``end_to_end``: the whole student runs; next-token LM loss and/or KL to the teacher's logits.

The optimiser, the schedule and both losses are components named in ``params.recovery`` (Hydra ``_target_``,
:mod:`layerfold.recovery.components`); the defaults are AdamW, linear warmup + cosine to ``min_lr``,
:class:`~layerfold.recovery.losses.LocalLoss` and :class:`~layerfold.recovery.losses.EndToEndLoss`.
Under ``hardware=sequential`` the student is *partial*: its skeleton lives on the meta device and only the
trained decoder layers are materialised, so the whole-student parts of a run go through ``lm_loss`` (the
validation LM loss, computed layer by layer) and end-to-end phases are refused.
LoRA (peft) adapters, when enabled, wrap the trained layers' linears and are merged back at the end;
a trained layer whose weights are new rather than pretrained (a replacement: a layer of a class the stock
architecture lacks, such as LLM-Streamline's ReLU MLP, or tensors the plan draws fresh, such as its SwiGLU
FFN) is trained in full instead, because a low-rank update of random weights cannot learn the layer and
the replacement is meant to be trained from scratch. What is refused before training and verified after it
(``layers_trained`` is what changed, tensor by tensor) lives in :mod:`layerfold.recovery.checks`; the resumable
state (trained tensors, optimiser, scheduler, position, written atomically every ``checkpoint_every`` steps, so a
killed run resumes and ends with the same weights) in :mod:`layerfold.recovery.state`.

The same loop runs on one process or on several (``accelerate launch`` / ``torchrun``) through
``accelerate.Accelerator``: process setup and device, bf16 autocast, gradient accumulation and its
synchronisation, and ``prepare`` of the trained module (DDP or FSDP2, :mod:`layerfold.recovery.distributed`),
optimiser, scheduler and the sharded data loader (:mod:`layerfold.recovery.batches`). The global batch
(``batch_size x grad_accum`` sequences over all processes) decides every optimiser step, so N processes
reproduce one. The main process alone writes checkpoints, shows progress and calls ``on_log``; every process reads
a checkpoint on resume; the final model (LoRA merged, FSDP2 shards gathered) exists on the main process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from layerfold.models.adapters import get_adapter
from layerfold.models.devices import peak_flops  # re-exported by layerfold.recovery
from layerfold.recovery import components
from layerfold.recovery.batches import IndexedRows, MicroBatches
from layerfold.recovery.checks import changed_layers, check_partial, check_settings, is_partial, layer_digests, patch_digests
from layerfold.recovery.distributed import (
    is_main_process,
    launched_processes,
    loads_sharded,
    make_accelerator,
    materialise,
    meta_skeleton,
    resolve_strategy,
    shard,
)
from layerfold.recovery.errors import RecoveryConfigError
from layerfold.recovery.local import SpanStudent, span_losses
from layerfold.recovery.losses import lm_loss
from layerfold.recovery.selectors import selected_layers, selected_parameters
from layerfold.recovery.spans import plan_spans, trainable_layers
from layerfold.recovery.state import TrainingState, fingerprint
from layerfold.recovery.teacher import LiveTeacher, SpanTargets

log = logging.getLogger(__name__)


@dataclass
class Phase:
    name: str
    kind: str  # local | end_to_end
    layers: list[int]  # student layers whose parameters train


@dataclass
class PhaseResult:
    name: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    val_before: float | None = None
    val_after: float | None = None


@dataclass
class RecoveryEngine:
    """Train ``student`` towards ``teacher`` on ``train`` blocks as ``cfg`` (``params.recovery``) says.

    Under a launcher every process builds the engine with the same models and data; the engine's
    ``accelerator`` says which process this is.
    """

    student: PreTrainedModel
    teacher: PreTrainedModel | None
    plan: dict
    cfg: DictConfig
    train: torch.Tensor  # [n, seq_len] token ids
    val: torch.Tensor  # [m, seq_len]
    state_dir: Path | None = None  # resumable checkpoints; None disables them
    on_step: Callable[[str, int], None] | None = None  # called after every optimiser step (tests, kill points)
    on_log: Callable[[dict], None] | None = None  # wandb mirror (main process only)
    progress: bool = True
    # The teacher's span boundaries for layer-local phases; None: live hooks on ``teacher`` (LiveTeacher).
    targets: SpanTargets | None = None
    # Mean validation next-token loss of a student model; None: the student's own forward (it must be whole).
    lm_loss: Callable[[nn.Module], float | None] | None = None
    # Where training runs; None: where the student's weights are (set it when they are on the host or the meta device).
    train_device: torch.device | None = None
    curve: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.processes = launched_processes()
        self.check(cfg, self.processes)
        self.adapter = get_adapter(self.student)
        teacher_layers = self.plan["original_layers"] if self.teacher is None else get_adapter(self.teacher).num_layers(self.teacher)
        self.spans = plan_spans(self.plan, self.adapter.num_layers(self.student), teacher_layers)
        selected = selected_layers(cfg, self.adapter, self.student)  # lm_head + last k layers, or LinearPatch patches
        self.layers_trained = trainable_layers(self.spans, cfg.trainable) if selected is None else selected
        if not self.layers_trained:
            raise RecoveryConfigError(
                f"recovery.trainable={cfg.trainable} selects no layer: no layer of the plan stands for more than one original layer "
                "(nothing merged, replaced or removed). Use recovery.trainable=layers, or recovery=none."
            )
        self.attention_free = list(self.plan.get("details", {}).get("attention_free_layers", []))
        self.phases = self._phases()
        # meta parameters: a layer-major student, unless this process's copy awaits its shards from the main process
        self.partial = is_partial(self.student) and not loads_sharded(cfg, self.processes)
        if self.partial:
            check_partial(cfg, self.student, [p.kind for p in self.phases], self.layers_trained, self.lm_loss is not None)
        # Under LoRA, the selected layers whose weights are new train in full (see the module docstring).
        self.full_layers = self._replacement_layers() if cfg.lora.enabled else []
        # What each decoder layer holds before training (main process: it alone receives the final model).
        self._digests_before = layer_digests(self.student) if is_main_process() else None
        self._patches_before = patch_digests(self.student) if is_main_process() else None
        if self.targets is None and self.teacher is not None:
            self.targets = LiveTeacher(self.teacher)
        if any(p.kind == "local" for p in self.phases) and self.targets is None:
            raise RecoveryConfigError("Layer-local distillation needs the dense teacher model or its stored span targets; pass one to the engine.")
        # The losses, built once from their components (recovery.local.criterion, recovery.end_to_end.criterion).
        self.local_loss = components.build(cfg, "local.criterion") if cfg.local.enabled else None
        self.end_to_end_loss = components.build(cfg, "end_to_end.criterion") if cfg.end_to_end.enabled else None
        if self.end_to_end_loss is not None and getattr(self.end_to_end_loss, "needs_teacher", False) and self.teacher is None:
            raise RecoveryConfigError("This recovery mode needs the dense teacher model; pass it to the engine.")
        self.peft_model = self._wrap_lora() if cfg.lora.enabled else None
        self.tracked = sorted({n for phase in self.phases for n in self._param_names(phase)})

        device = self.train_device or self._weight().device
        self.strategy = resolve_strategy(cfg.distributed, self.processes, self._trainable_fraction(),
                                         any(p.kind == "local" for p in self.phases), device.type)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.accumulation = cfg.grad_accum // self.processes  # micro-batches per optimiser step on this process
        self.accelerator = make_accelerator(self.strategy, device, bf16, self.accumulation)
        self.device = self.accelerator.device
        if self.partial:  # only the trained layers exist; the meta skeleton stays where it is
            for k in self.layers_trained:
                self.adapter.get_layers(self.student)[k].to(self.device)
        elif self.strategy != "fsdp2":
            self.student.to(self.device)
        self.precision = "bf16-autocast" if bf16 else str(self._weight().dtype).replace("torch.", "")
        # FSDP2 shards the student in place; this structure without memory takes the gathered weights at the end.
        self._skeleton = meta_skeleton(self.peft_model or self.student) if self.strategy == "fsdp2" else None
        if self.strategy == "fsdp2":  # sharded now, so validation before training runs on the shards too
            self.student = shard(self.accelerator, self.student)
        if self.teacher is not None and loads_sharded(cfg, self.processes):
            self.teacher = shard(self.accelerator, self.teacher)  # frozen: sharded weights, no gradient or optimiser state
        elif self.teacher is not None:
            self.teacher.to(self.device)  # frozen and never prepared: each process keeps a whole copy
        # A checkpoint's optimiser state is per parameter id (replicated) or gathered by name (FSDP2): not interchangeable.
        self.fingerprint = fingerprint(OmegaConf.to_container(cfg, resolve=True), self.plan["layers"], list(self.train.shape),
                                       int(self.train.sum()), self.strategy == "fsdp2")
        self.state = TrainingState(self.state_dir, self.fingerprint, sharded=self.strategy == "fsdp2")
        if self.processes > 1:
            log.info("recovery on %d processes: %s, %d micro-batch(es) of %d per process and step, global batch %d sequences",
                     self.processes, self.strategy, self.accumulation, cfg.batch_size, cfg.batch_size * cfg.grad_accum)

    # -- configuration -------------------------------------------------------------------------
    # Errors a user can fix, raised before any model work (``processes``: how many were launched).
    check = staticmethod(check_settings)

    def _weight(self) -> nn.Parameter:
        """A parameter of the student that holds memory: its device and dtype are the student's (meta skeleton aside)."""
        return next((p for p in self.student.parameters() if not p.is_meta), next(self.student.parameters()))

    def _phases(self) -> list[Phase]:
        phases = []
        if self.cfg.local.enabled:
            if self.cfg.local.order == "sequential":
                phases += [Phase(f"local:{k}", "local", [k]) for k in self.layers_trained]
            else:
                phases.append(Phase("local", "local", list(self.layers_trained)))
        if self.cfg.end_to_end.enabled:
            phases.append(Phase("end_to_end", "end_to_end", list(self.layers_trained)))
        return phases

    def _param_names(self, phase: Phase) -> list[str]:
        selected = selected_parameters(self.cfg, self.adapter, self.student, phase.layers)
        if selected is not None:
            return selected
        prefixes = tuple(f"{self.adapter.layers}.{k}." for k in phase.layers)
        full = tuple(f"{self.adapter.layers}.{k}." for k in phase.layers if k in self.full_layers)
        frozen = tuple(f"{self.adapter.layers}.{k}.{self.adapter.attention}." for k in self.attention_free)
        names = []
        for name, _ in self.student.named_parameters():
            if name.startswith(frozen):
                continue  # attention of an FFN-only replacement stays exactly zero
            if self.cfg.lora.enabled:
                if ("lora_" in name and name.startswith(prefixes)) or (full and name.startswith(full)):
                    names.append(name)
            elif name.startswith(prefixes) or (self.cfg.trainable == "all" and phase.kind == "end_to_end"):
                names.append(name)
        return names

    def _trainable_fraction(self) -> float:
        """Share of the student's parameters that train in some phase (LoRA: the adapters)."""
        params = dict(self.student.named_parameters())
        return sum(params[n].numel() for n in self.tracked) / sum(p.numel() for p in params.values())

    def _replacement_layers(self) -> list[int]:
        """Selected layers whose weights are new rather than pretrained: a linear LoRA's targets (the adapter's stock
        projections) cannot name (a layer of a class the architecture lacks), or weights the plan draws fresh."""
        decoder = self.adapter.get_layers(self.student)
        stock = set(self.adapter.linears)
        new = []
        for k in self.layers_trained:
            drawn = (self.plan["layers"][k].get("init") or {}).get("normal")
            foreign = any(isinstance(module, nn.Linear) and name not in stock for name, module in decoder[k].named_modules())
            if drawn or foreign:
                new.append(k)
        return new

    def _wrap_lora(self):
        from peft import LoraConfig, get_peft_model

        targets = [
            f"{self.adapter.layers}.{k}.{linear}"
            for k in self.layers_trained
            if k not in self.full_layers
            for linear in self.adapter.linears
            if not (k in self.attention_free and linear.startswith(self.adapter.attention + "."))
        ]
        if not targets:  # every selected layer trains in full: nothing for an adapter to wrap
            return None
        lora = self.cfg.lora
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none")
        # peft injects the adapters into self.student's own modules; the wrapper is kept only to merge them later.
        # Their initial values come from the run's seed (recovery.data.seed), not from whatever the global
        # generator went through before: resident and layer-major runs start from the same adapters.
        device = self._weight().device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.cfg.data.seed)
            return get_peft_model(self.student, config)

    # -- data -----------------------------------------------------------------------------------
    def _micro_batches_per_epoch(self) -> int:
        return math.ceil(self.train.shape[0] / self.cfg.batch_size)

    def _total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return int(self.cfg.max_steps)
        return math.ceil(self.cfg.epochs * self._micro_batches_per_epoch() / self.cfg.grad_accum)

    def _loader(self, first_step: int, total: int) -> DataLoader:
        """The global micro-batches of optimiser steps ``first_step .. total - 1`` as ``[row indices, token ids]``;
        ``prepare`` shards them over the processes. Stored targets are looked up by row."""
        cfg = self.cfg
        order = MicroBatches(self.train.shape[0], cfg.batch_size, cfg.data.seed, first_step * cfg.grad_accum, total * cfg.grad_accum)
        return DataLoader(IndexedRows(self.train), batch_sampler=order)

    # -- losses ---------------------------------------------------------------------------------
    def _loss(self, phase: Phase, split: str, rows: torch.Tensor, batch: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """The phase's loss on ``batch`` (rows ``rows`` of ``split``); ``module`` is the prepared trained module (None: the
        plain student, for validation)."""
        with self.accelerator.autocast():
            if phase.kind == "local":
                spans = [self.spans[k] for k in phase.layers]
                inputs, outputs = self.targets.fetch(split, rows, batch, spans)
                span_student = module if module is not None else SpanStudent(self.student, phase.layers)
                losses = span_losses(span_student, spans, inputs, outputs, self._weight().dtype, self.local_loss)
                return torch.stack(losses).sum()
            logits = (module if module is not None else self.student)(input_ids=batch, use_cache=False).logits
            teacher_logits = None
            if getattr(self.end_to_end_loss, "needs_teacher", False):
                with torch.no_grad():
                    teacher_logits = self.teacher(input_ids=batch, use_cache=False).logits
            return self.end_to_end_loss(logits, batch, teacher_logits)

    @torch.no_grad()
    def _validate(self, phase: Phase) -> float:
        """Mean phase loss on the validation blocks; every process computes it on all of them (the same number)."""
        total = 0.0
        batches = range(0, self.val.shape[0], self.cfg.batch_size)
        for start in batches:
            rows = torch.arange(start, min(start + self.cfg.batch_size, self.val.shape[0]))
            total += float(self._loss(phase, "val", rows, self.val[rows].to(self.device)))
        return total / max(1, len(batches))

    @torch.no_grad()
    def validation_lm_loss(self, model: PreTrainedModel) -> float | None:
        """Mean next-token loss of ``model`` on the validation blocks (the headline before/after number)."""
        if self.lm_loss is not None:
            return self.lm_loss(model)
        total, count = 0.0, 0
        for start in range(0, self.val.shape[0], self.cfg.batch_size):
            batch = self.val[start : start + self.cfg.batch_size].to(self.device)
            with self.accelerator.autocast():
                logits = model(input_ids=batch, use_cache=False).logits
            total += float(lm_loss(logits, batch)) * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
        return total / max(1, count)

    # -- cost -----------------------------------------------------------------------------------
    def _flops_per_token(self, phase: Phase) -> float:
        """Matmul FLOPs per training token (2 per parameter forward, 4 backward; attention scores ignored)."""
        def layer_params(model, indices):
            layers = get_adapter(model).get_layers(model)
            return sum(p.numel() for i in indices for n, p in layers[i].named_parameters() if "lora_" not in n)

        head = self.student.get_output_embeddings().weight.numel()
        if phase.kind == "local":
            spans = [self.spans[k] for k in phase.layers]
            return self.targets.teacher_flops_per_token(spans) + 6 * layer_params(self.student, phase.layers)
        n = self.adapter.num_layers(self.student)
        first = min(phase.layers)
        student = 2 * (layer_params(self.student, range(n)) + head) + 2 * (layer_params(self.student, range(first, n)) + head)
        student += 2 * layer_params(self.student, phase.layers)
        teacher = 2 * (layer_params(self.teacher, range(get_adapter(self.teacher).num_layers(self.teacher))) + head) if getattr(self.end_to_end_loss, "needs_teacher", False) else 0
        return student + teacher

    # -- across processes -----------------------------------------------------------------------
    def _step_totals(self, loss: torch.Tensor, tokens: int) -> tuple[float, int]:
        """This step's loss averaged over processes (each already the mean of its micro-batches) and its tokens summed."""
        totals = torch.stack([loss.double(), torch.tensor(float(tokens), dtype=torch.float64, device=loss.device)])
        totals = self.accelerator.reduce(totals, "sum")
        return float(totals[0]) / self.processes, int(totals[1])

    def per_process(self, value: Any) -> list[Any]:
        """``value`` from every process, in rank order (a collective: every process must call it)."""
        if self.processes == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> tuple[PreTrainedModel | None, dict]:
        """Train every phase; returns the trained student (LoRA merged) and a summary for metrics.

        Every process must call it. The model is returned on the main process only (None on the
        others): with FSDP2 it is gathered from the shards into a plain model on the host.
        """
        resume = self.state.load(self.student)
        if resume is not None:
            self.curve = list(resume["curve"])
            self.validation = list(resume["validation"])
        results: list[PhaseResult] = [PhaseResult(**r) for r in resume["results"]] if resume else []
        lm_before = self.validation_lm_loss(self.student) if resume is None else None
        for index, phase in enumerate(self.phases):
            if resume is not None and index < resume["phase"]:
                continue
            state = resume if resume is not None and index == resume["phase"] else None
            results = [r for r in results if r.name != phase.name] + [self._run_phase(index, phase, state, results)]
            resume = None
        self.student.eval()
        params = dict(self.student.named_parameters())
        trained_parameters = sum(params[n].numel() for n in self.tracked)
        summary = {
            "phases": [r.__dict__ for r in results],
            "layers_selected": self.layers_trained,  # what recovery.trainable picks; layers_trained (below) is what changed
            "layers_fully_trained": self.full_layers if self.cfg.lora.enabled else self.layers_trained,
            "precision": self.precision,
            "distributed": self.strategy,
            "processes": self.processes,
            "global_batch_sequences": self.cfg.batch_size * self.cfg.grad_accum,
            "val_lm_loss_before": lm_before,
            "val_lm_loss_after": self.validation_lm_loss(self.student),  # LoRA not yet merged: the same function
            "trained_parameters": trained_parameters,  # LoRA: the adapters' parameters and those of layers trained in full
        }
        model = self._final_model()
        if model is not None:  # the main process: the final weights against the ones training started from
            summary["layers_trained"] = changed_layers(model, self.cfg, self.layers_trained, self._digests_before, self._patches_before)
            summary["spans"] = {s.layer: [s.start, s.end] for s in self.spans if s.layer in summary["layers_trained"]}
        if self.accelerator.is_main_process:
            self.state.clear()
        return model, summary

    def _final_model(self) -> PreTrainedModel | None:
        """The trained student as one plain model on the main process, LoRA merged once; None on the others."""
        if self.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # Every process sends its shards; the main process receives the whole state on the host.
            full = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.accelerator.is_main_process:
                return None
            wrapper = self._skeleton
            materialise(wrapper.get_base_model() if self.peft_model is not None else wrapper, full)
        else:
            if not self.accelerator.is_main_process:
                return None
            wrapper = self.peft_model if self.peft_model is not None else self.student
        return wrapper.merge_and_unload() if self.peft_model is not None else wrapper

    def _set_trainable(self, phase: Phase) -> list[nn.Parameter]:
        names = set(self._param_names(phase))
        params = []
        for name, param in self.student.named_parameters():
            param.requires_grad_(name in names)
            if name in names:
                params.append(param)
        return params

    def summary_metrics(self, summary: dict, device_name: str) -> dict:
        """Throughput of the whole run: tokens (all processes), seconds, tokens/s and MFU against the
        bf16 peak of all the processes' devices together."""
        tokens = sum(p["tokens"] for p in summary["phases"])
        seconds = sum(p["seconds"] for p in summary["phases"])
        flops = sum(p["flops"] for p in summary["phases"])
        peak = peak_flops(device_name)
        peak = peak * summary.get("processes", 1) if peak else None
        return {
            "train_tokens_processed": tokens,
            "train_seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "mfu": round(flops / seconds / peak, 4) if seconds and peak else None,
        }

    def _run_phase(self, index: int, phase: Phase, state: dict | None, results: list[PhaseResult]) -> PhaseResult:
        cfg = self.cfg
        params = self._set_trainable(phase)
        # Biases and norms never decay; the rest with the optimiser's weight decay (recovery.weight_decay by default).
        groups = [{"params": [p for p in params if p.ndim > 1]}, {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        optimizer = components.build(cfg, "optimizer", groups)
        total = self._total_steps()
        scheduler = components.build(cfg, "schedule", optimizer, total_steps=total)
        result = next((r for r in results if r.name == phase.name), None) if state else None
        result = result or PhaseResult(phase.name)
        first_step = state["step"] if state is not None else 0
        if state is None:
            result.val_before = self._validate(phase)
            self.validation.append({"phase": phase.name, "step": 0, "val_loss": result.val_before})
        flops_per_token = self._flops_per_token(phase)
        # What trains goes through accelerate: DDP or FSDP2 around it, the optimiser, the schedule, the sharded loader.
        module = SpanStudent(self.student, phase.layers) if phase.kind == "local" else self.student
        module, optimizer, scheduler, loader = self.accelerator.prepare(module, optimizer, scheduler, self._loader(first_step, total))
        if state is not None:
            self.state.load_optimizer(module, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        trained = [p for p in module.parameters() if p.requires_grad]  # FSDP2 replaced them by shards
        self.student.train()
        main = self.accelerator.is_main_process
        bar = tqdm(range(first_step, total), desc=f"recover {phase.name}", disable=not (self.progress and main), unit="step",
                   initial=first_step, total=total)
        window_loss, window_steps = 0.0, 0
        batches = iter(loader)
        for step in bar:
            started = time.perf_counter()
            step_loss, step_tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0
            for _ in range(self.accumulation):
                rows, batch = next(batches)
                # accumulate(): gradients are synchronised across processes on the step's last micro-batch only.
                with self.accelerator.accumulate(module):
                    loss = self._loss(phase, "train", rows, batch, module)
                    self.accelerator.backward(loss)  # scaled by 1 / accumulation
                step_loss += loss.detach().double() / self.accumulation
                step_tokens += batch.numel()
            if cfg.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(trained, cfg.max_grad_norm)
            lr_used = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_tokens = self._step_totals(step_loss, step_tokens)  # waits for the step to finish
            seconds = time.perf_counter() - started
            result.steps, result.tokens = step + 1, result.tokens + step_tokens
            result.seconds += seconds
            result.flops += flops_per_token * step_tokens
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            bar.set_postfix(loss=f"{step_loss:.4g}", lr=f"{lr_used:.2e}", tok_s=f"{step_tokens / seconds:,.0f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                point = {"phase": phase.name, "step": step + 1, "loss": window_loss / window_steps, "lr": lr_used, "tokens": result.tokens}
                self.curve.append(point)
                if self.on_log and main:
                    self.on_log({f"recover/{phase.name}/{k}": v for k, v in point.items() if k != "phase"})
                window_loss, window_steps = 0.0, 0
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                self.validation.append({"phase": phase.name, "step": step + 1, "val_loss": self._validate(phase)})
                self.student.train()
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                self.state.save(main, self.student, self.tracked, module, optimizer, scheduler, {
                    "phase": index, "step": step + 1, "curve": self.curve, "validation": self.validation,
                    "results": [r.__dict__ for r in results if r.name != phase.name] + [result.__dict__]})
            if self.on_step:
                self.on_step(phase.name, step + 1)
        bar.close()
        for _ in batches:  # let accelerate's loader reach its end (it tracks the active loader for gradient sync)
            pass
        self.accelerator.unwrap_model(module, keep_fp32_wrapper=False)  # gives the student back its own forward
        self.accelerator.free_memory()  # drops the DDP wrapper and the prepared optimiser, schedule and loader
        self.student.eval()
        for param in self.student.parameters():
            param.requires_grad_(False)
        result.val_after = self._validate(phase)
        self.validation.append({"phase": phase.name, "step": total, "val_loss": result.val_after})
        log.info("%s: %d steps, %d tokens, val loss %.5g -> %.5g", phase.name, total, result.tokens, result.val_before or float("nan"), result.val_after)
        return result
