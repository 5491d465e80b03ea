"""The recovery engine: one training loop for every method, driven by ``plan.json``.

A run is a list of *phases*, each one pass of the same loop (optimiser, warmup + cosine schedule
stepped per optimiser step, gradient accumulation, clipping, bf16 autocast on CUDA):

- ``local``: layer-local distillation. The dense teacher runs forward on the batch; hooks take the
  hidden state entering each trained layer's span together with the exact keyword arguments the
  teacher's own decoder layer received there (the causal mask the model built, the rotary
  ``position_embeddings`` from its own ``rotary_emb``, ``position_ids``), and the hidden state leaving
  the span. The student layer is called with that input and those arguments, i.e. exactly as inside
  the full model, and fits the span output (``mse`` / ``cosine`` / ``kl``). Layers train jointly on
  one teacher pass (``order: joint``) or one after another (``order: sequential``, a phase each).
- ``end_to_end``: the whole student runs; next-token LM loss and/or KL to the teacher's logits.

Teacher targets are computed on the fly, batch by batch, so host memory is O(batch), never O(dataset).
LoRA (peft) adapters, when enabled, wrap the trained layers' linears and are merged back at the end.
Checkpoints (trained tensors, optimiser, scheduler, position) are written atomically every
``checkpoint_every`` steps; a killed run resumes from the last one and ends with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from layerfold.io import atomic_file
from layerfold.models.adapters import get_adapter
from layerfold.recovery.losses import LOCAL_LOSSES, lm_loss, local_loss, logit_kd
from layerfold.recovery.schedule import warmup_cosine
from layerfold.recovery.spans import Span, plan_spans, trainable_layers

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; other devices report no MFU rather than a guess.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


class RecoveryConfigError(ValueError):
    pass


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


class _StopForward(Exception):
    """Raised by a teacher hook once every target of the batch is captured (the rest of the forward is not needed)."""


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class TeacherTaps:
    """Hooks on the teacher capturing span inputs (with the layer's call kwargs) and span outputs."""

    def __init__(self, teacher: PreTrainedModel, spans: list[Span]) -> None:
        self.layers = get_adapter(teacher).get_layers(teacher)
        self.spans = spans
        self.inputs: dict[int, tuple[torch.Tensor, dict]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.last = max(s.end for s in spans) - 1
        self._handles: list = []

    def __enter__(self) -> TeacherTaps:
        for start in {s.start for s in self.spans}:
            def save_input(module, args, kwargs, start=start):
                hidden = args[0] if args else kwargs["hidden_states"]
                self.inputs[start] = (hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            self._handles.append(self.layers[start].register_forward_pre_hook(save_input, with_kwargs=True))
        for end in {s.end for s in self.spans}:
            def save_output(module, args, output, end=end):
                self.outputs[end] = _hidden(output).detach()
                if end - 1 == self.last:
                    raise _StopForward
            self._handles.append(self.layers[end - 1].register_forward_hook(save_output))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def run(self, teacher: PreTrainedModel, input_ids: torch.Tensor) -> None:
        self.inputs.clear()
        self.outputs.clear()
        try:
            teacher(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run a decoder layer as the model's forward does, with the kwargs the teacher's layer received."""
    return _hidden(layer(hidden, **kwargs))


def local_span_losses(teacher: PreTrainedModel, student: PreTrainedModel, spans: list[Span], input_ids: torch.Tensor, kind: str,
                      temperature: float = 1.0, ignore_first: int = 0) -> list[torch.Tensor]:
    """Layer-local loss of each span's student layer on one batch (teacher forward inside), over positions ``ignore_first:``."""
    layers = get_adapter(student).get_layers(student)
    dtype = next(student.parameters()).dtype
    with TeacherTaps(teacher, spans) as taps:
        taps.run(teacher, input_ids)
    losses = []
    for span in spans:
        hidden, kwargs = taps.inputs[span.start]
        out = call_layer(layers[span.layer], hidden.to(dtype), kwargs)
        losses.append(local_loss(out[:, ignore_first:], taps.outputs[span.end][:, ignore_first:], kind, temperature))
    return losses


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class RecoveryEngine:
    """Train ``student`` towards ``teacher`` on ``train`` blocks as ``cfg`` (``params.recovery``) says."""

    student: PreTrainedModel
    teacher: PreTrainedModel | None
    plan: dict
    cfg: DictConfig
    train: torch.Tensor  # [n, seq_len] token ids
    val: torch.Tensor  # [m, seq_len]
    state_dir: Path | None = None  # resumable checkpoints; None disables them
    on_step: Callable[[str, int], None] | None = None  # called after every optimiser step (tests, kill points)
    on_log: Callable[[dict], None] | None = None  # wandb mirror
    progress: bool = True
    curve: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.check(cfg)
        self.adapter = get_adapter(self.student)
        teacher_layers = self.plan["original_layers"] if self.teacher is None else get_adapter(self.teacher).num_layers(self.teacher)
        self.spans = plan_spans(self.plan, self.adapter.num_layers(self.student), teacher_layers)
        self.device = next(self.student.parameters()).device
        self.layers_trained = trainable_layers(self.spans, cfg.trainable)
        if not self.layers_trained:
            raise RecoveryConfigError(
                f"recovery.trainable={cfg.trainable} selects no layer: no layer of the plan stands for more than one original layer "
                "(nothing merged, replaced or removed). Use recovery.trainable=layers, or recovery=none."
            )
        self.attention_free = list(self.plan.get("details", {}).get("attention_free_layers", []))
        self.phases = self._phases()
        if any(p.kind == "local" for p in self.phases) or (cfg.end_to_end.enabled and cfg.end_to_end.kd_weight > 0):
            if self.teacher is None:
                raise RecoveryConfigError("This recovery mode needs the dense teacher model; pass it to the engine.")
        autocast = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
        self.precision = "bf16-autocast" if autocast else str(next(self.student.parameters()).dtype).replace("torch.", "")
        self.peft_model = self._wrap_lora() if cfg.lora.enabled else None
        self.tracked = sorted({n for phase in self.phases for n in self._param_names(phase)})
        self.fingerprint = _fingerprint(OmegaConf.to_container(cfg, resolve=True), self.plan["layers"], list(self.train.shape), int(self.train.sum()))

    # -- configuration -------------------------------------------------------------------------
    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Errors a user can fix, raised before any model work."""
        if cfg.lr <= 0:
            raise RecoveryConfigError(f"recovery.lr={cfg.lr} must be > 0 (e.g. 2e-4); use recovery=none to skip training.")
        if not 0 <= cfg.min_lr <= cfg.lr:
            raise RecoveryConfigError(f"recovery.min_lr={cfg.min_lr} must lie in [0, recovery.lr={cfg.lr}].")
        if cfg.local.loss not in LOCAL_LOSSES:
            raise RecoveryConfigError(f"recovery.local.loss='{cfg.local.loss}' is unknown; choose one of {', '.join(LOCAL_LOSSES)}.")
        if cfg.local.ignore_first >= cfg.data.seq_len:
            raise RecoveryConfigError(f"recovery.local.ignore_first={cfg.local.ignore_first} leaves no position of a {cfg.data.seq_len}-token block; lower it.")
        if not (cfg.local.enabled or cfg.end_to_end.enabled):
            raise RecoveryConfigError(
                f"recovery={cfg.name} enables neither local.enabled nor end_to_end.enabled; enable one, or use recovery=none."
            )
        if cfg.end_to_end.enabled and cfg.end_to_end.lm_weight <= 0 and cfg.end_to_end.kd_weight <= 0:
            raise RecoveryConfigError("recovery.end_to_end is enabled with lm_weight=0 and kd_weight=0; give one a positive weight.")
        if cfg.lora.enabled and cfg.trainable == "all":
            raise RecoveryConfigError("recovery.lora.enabled with trainable=all: LoRA adapts linears of decoder layers; use trainable=layers or new.")

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
        prefixes = tuple(f"{self.adapter.layers}.{k}." for k in phase.layers)
        frozen = tuple(f"{self.adapter.layers}.{k}.{self.adapter.attention}." for k in self.attention_free)
        names = []
        for name, _ in self.student.named_parameters():
            if name.startswith(frozen):
                continue  # attention of an FFN-only replacement stays exactly zero
            if self.cfg.lora.enabled:
                if "lora_" in name and name.startswith(prefixes):
                    names.append(name)
            elif name.startswith(prefixes) or (self.cfg.trainable == "all" and phase.kind == "end_to_end"):
                names.append(name)
        return names

    def _wrap_lora(self):
        from peft import LoraConfig, get_peft_model

        targets = [
            f"{self.adapter.layers}.{k}.{linear}"
            for k in self.layers_trained
            for linear in self.adapter.linears
            if not (k in self.attention_free and linear.startswith(self.adapter.attention + "."))
        ]
        lora = self.cfg.lora
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none")
        # peft injects the adapters into self.student's own modules; the wrapper is kept only to merge them later.
        return get_peft_model(self.student, config)

    # -- data -----------------------------------------------------------------------------------
    def _micro_batches_per_epoch(self) -> int:
        return math.ceil(self.train.shape[0] / self.cfg.batch_size)

    def _total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return int(self.cfg.max_steps)
        return math.ceil(self.cfg.epochs * self._micro_batches_per_epoch() / self.cfg.grad_accum)

    def _micro_batch(self, index: int) -> torch.Tensor:
        """Micro-batch ``index`` of the endless, seeded sequence of shuffled epochs (resumable by index)."""
        per_epoch = self._micro_batches_per_epoch()
        epoch, chunk = divmod(index, per_epoch)
        order = torch.randperm(self.train.shape[0], generator=torch.Generator().manual_seed(self.cfg.data.seed * 1000 + epoch))
        rows = order[chunk * self.cfg.batch_size : (chunk + 1) * self.cfg.batch_size]
        return self.train[rows].to(self.device)

    # -- losses ---------------------------------------------------------------------------------
    def _loss(self, phase: Phase, batch: torch.Tensor) -> torch.Tensor:
        if phase.kind == "local":
            spans = [self.spans[k] for k in phase.layers]
            with self.autocast:
                local = self.cfg.local
                losses = local_span_losses(self.teacher, self.student, spans, batch, local.loss, local.temperature, local.ignore_first)
            return torch.stack(losses).sum()
        e2e = self.cfg.end_to_end
        with self.autocast:
            logits = self.student(input_ids=batch, use_cache=False).logits
            loss = e2e.lm_weight * lm_loss(logits, batch) if e2e.lm_weight > 0 else logits.new_zeros((), dtype=torch.float32)
            if e2e.kd_weight > 0:
                with torch.no_grad():
                    teacher_logits = self.teacher(input_ids=batch, use_cache=False).logits
                loss = loss + e2e.kd_weight * logit_kd(logits, teacher_logits, e2e.kd_temperature)
        return loss

    @torch.no_grad()
    def _validate(self, phase: Phase) -> float:
        total = 0.0
        batches = range(0, self.val.shape[0], self.cfg.batch_size)
        for start in batches:
            total += float(self._loss(phase, self.val[start : start + self.cfg.batch_size].to(self.device)))
        return total / max(1, len(batches))

    @torch.no_grad()
    def validation_lm_loss(self, model: PreTrainedModel) -> float:
        """Mean next-token loss of ``model`` on the validation blocks (the headline before/after number)."""
        total, count = 0.0, 0
        for start in range(0, self.val.shape[0], self.cfg.batch_size):
            batch = self.val[start : start + self.cfg.batch_size].to(self.device)
            with self.autocast:
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
            teacher = 2 * layer_params(self.teacher, range(max(s.end for s in spans)))
            return teacher + 6 * layer_params(self.student, phase.layers)
        n = self.adapter.num_layers(self.student)
        first = min(phase.layers)
        student = 2 * (layer_params(self.student, range(n)) + head) + 2 * (layer_params(self.student, range(first, n)) + head)
        student += 2 * layer_params(self.student, phase.layers)
        teacher = 2 * (layer_params(self.teacher, range(get_adapter(self.teacher).num_layers(self.teacher))) + head) if self.cfg.end_to_end.kd_weight > 0 else 0
        return student + teacher

    # -- checkpoints ----------------------------------------------------------------------------
    def _state_path(self) -> Path | None:
        return None if self.state_dir is None else Path(self.state_dir) / "state.pt"

    def _save_state(self, phase_index: int, step: int, optimizer, scheduler, results: list[PhaseResult]) -> None:
        path = self._state_path()
        if path is None:
            return
        params = dict(self.student.named_parameters())
        state = {
            "fingerprint": self.fingerprint,
            "phase": phase_index,
            "step": step,
            "tensors": {n: params[n].detach().cpu().clone() for n in self.tracked},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "curve": self.curve,
            "validation": self.validation,
            "results": [r.__dict__ for r in results],
        }
        with atomic_file(path, "wb") as handle:
            torch.save(state, handle)

    def _load_state(self) -> dict | None:
        path = self._state_path()
        if path is None or not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring %s: it was written for other settings or data", path)
            return None
        params = dict(self.student.named_parameters())
        with torch.no_grad():
            for name, tensor in state["tensors"].items():
                params[name].copy_(tensor)
        self.curve = list(state["curve"])
        self.validation = list(state["validation"])
        log.info("resuming from %s: phase %d, step %d", path, state["phase"], state["step"])
        return state

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> tuple[PreTrainedModel, dict]:
        """Train every phase; returns the trained student (LoRA merged) and a summary for metrics."""
        resume = self._load_state()
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
        model = self.peft_model.merge_and_unload() if self.peft_model is not None else self.student
        summary = {
            "phases": [r.__dict__ for r in results],
            "layers_trained": self.layers_trained,
            "spans": {s.layer: [s.start, s.end] for s in self.spans if s.layer in self.layers_trained},
            "precision": self.precision,
            "val_lm_loss_before": lm_before,
            "val_lm_loss_after": self.validation_lm_loss(model),
            "trained_parameters": trained_parameters,  # LoRA: the adapters' parameters
        }
        if self.state_dir is not None and self._state_path().exists():
            self._state_path().unlink()
        return model, summary

    def _set_trainable(self, phase: Phase) -> list[nn.Parameter]:
        names = set(self._param_names(phase))
        params = []
        for name, param in self.student.named_parameters():
            param.requires_grad_(name in names)
            if name in names:
                params.append(param)
        return params

    def summary_metrics(self, summary: dict, device_name: str) -> dict:
        """Throughput of the whole run: tokens, seconds, tokens/s and MFU against the device's bf16 peak."""
        tokens = sum(p["tokens"] for p in summary["phases"])
        seconds = sum(p["seconds"] for p in summary["phases"])
        flops = sum(p["flops"] for p in summary["phases"])
        peak = peak_flops(device_name)
        return {
            "train_tokens_processed": tokens,
            "train_seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "mfu": round(flops / seconds / peak, 4) if seconds and peak else None,
        }

    def _run_phase(self, index: int, phase: Phase, state: dict | None, results: list[PhaseResult]) -> PhaseResult:
        cfg = self.cfg
        params = self._set_trainable(phase)
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        )
        total = self._total_steps()
        scheduler = warmup_cosine(optimizer, total, cfg.warmup_ratio, cfg.lr, cfg.min_lr)
        result = next((r for r in results if r.name == phase.name), None) if state else None
        result = result or PhaseResult(phase.name)
        first_step = 0
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            first_step = state["step"]
        else:
            result.val_before = self._validate(phase)
            self.validation.append({"phase": phase.name, "step": 0, "val_loss": result.val_before})
        flops_per_token = self._flops_per_token(phase)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.train.shape[1]
        self.student.train()
        bar = tqdm(range(first_step, total), desc=f"recover {phase.name}", disable=not self.progress, unit="step", initial=first_step, total=total)
        window_loss, window_steps = 0.0, 0
        for step in bar:
            started = time.perf_counter()
            step_loss, step_tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = self._micro_batch(step * cfg.grad_accum + micro)
                loss = self._loss(phase, batch) / cfg.grad_accum
                loss.backward()
                step_loss += float(loss.detach())
                step_tokens += batch.numel()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr_used = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - started
            result.steps, result.tokens = step + 1, result.tokens + step_tokens
            result.seconds += seconds
            result.flops += flops_per_token * step_tokens
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            bar.set_postfix(loss=f"{step_loss:.4g}", lr=f"{lr_used:.2e}", tok_s=f"{step_tokens / seconds:,.0f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                point = {"phase": phase.name, "step": step + 1, "loss": window_loss / window_steps, "lr": lr_used, "tokens": result.tokens}
                self.curve.append(point)
                if self.on_log:
                    self.on_log({f"recover/{phase.name}/{k}": v for k, v in point.items() if k != "phase"})
                window_loss, window_steps = 0.0, 0
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
                self.validation.append({"phase": phase.name, "step": step + 1, "val_loss": self._validate(phase)})
                self.student.train()
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                self._save_state(index, step + 1, optimizer, scheduler, [r for r in results if r.name != phase.name] + [result])
            if self.on_step:
                self.on_step(phase.name, step + 1)
        bar.close()
        self.student.eval()
        for param in params:
            param.requires_grad_(False)
        result.val_after = self._validate(phase)
        self.validation.append({"phase": phase.name, "step": total, "val_loss": result.val_after})
        log.info("%s: %d steps, %d tokens, val loss %.5g -> %.5g", phase.name, total, result.tokens, result.val_before or float("nan"), result.val_after)
        return result


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak, or None when unknown (no MFU is reported then)."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def host_peak_rss_mib() -> float:
    """Process high-water resident memory (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
