"""Typed schemas for ``params.yaml``.

DVC composes ``conf/`` into ``params.yaml`` with Hydra; every stage reads that file back through
:func:`load_params`, which merges it onto these dataclasses in struct mode so a misspelt key fails
loudly instead of silently falling back to a default. Method-specific settings are validated by the
method's own dataclass (see :mod:`layerfold.methods`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, ValidationError


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    source: str = "package"  # hub | local | gguf | package | llama2c
    id: Optional[str] = None  # hub repository id
    revision: Optional[str] = None
    path: Optional[str] = None  # local HF dir, GGUF file, or llama2.c checkpoint
    package: Optional[str] = None  # installed distribution holding the weights file
    file: Optional[str] = None  # path of the weights file inside that distribution
    tokenizer: Optional[str] = None  # llama2.c tokenizer (tok512.bin style)
    storage_dtype: str = "bfloat16"  # dtype of the saved base checkpoint


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA
    seed: int = 0


@dataclass
class CalibrationConfig:
    source: str = "wikitext2_train"  # wikitext2_train | c4 | <hub fallback names>
    num_blocks: int = 16
    seq_len: int = 256
    chunking: str = "concat"  # concat: join documents, cut windows | per_document: one window per document
    add_bos: bool = True
    seed: int = 0


@dataclass
class DataConfig:
    local_dir: Optional[str] = None  # None -> $LAYERFOLD_DATA_DIR, else the hub
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    benchmarks: list[str] = field(
        default_factory=lambda: [
            "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa", "mmlu",
        ]
    )


@dataclass
class CaptureConfig:
    batch_size: int = 4


@dataclass
class PerplexityConfig:
    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    seq_len: int = 1024
    max_windows: Optional[int] = None  # cap for CPU runs; None = the whole test set
    add_bos: bool = False  # GPTQ/SparseGPT protocol: plain non-overlapping token windows
    batch_size: int = 1


@dataclass
class LmEvalConfig:
    tasks: list[str] = field(default_factory=list)
    num_fewshot: dict[str, int] = field(default_factory=lambda: {"mmlu": 5})
    limit: Optional[float] = None  # docs per task (int) or fraction (<1); None = full sets
    batch_size: int = 16
    max_length: Optional[int] = None
    bootstrap_iters: int = 1000


@dataclass
class EfficiencyConfig:
    enabled: bool = True
    batch_size: int = 1
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3


@dataclass
class EvalConfig:
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)


@dataclass
class TrackingConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "layerfold"
    entity: Optional[str] = None
    dir: Optional[str] = None  # where wandb writes; None -> $WANDB_DIR or the system temp dir


@dataclass
class ReportConfig:
    experiments_dir: str = "reports/experiments"  # metrics of finished experiments, for the accuracy/size plot


@dataclass
class Params:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    method: Any = None  # validated by the chosen method's own dataclass (layerfold.methods.get_method)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and the fix."""


def _suggest(key: str, node: Any) -> str:
    options = list(node.keys()) if isinstance(node, (dict, DictConfig)) else []
    close = difflib.get_close_matches(key, [str(o) for o in options], n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(map(str, options))}."


def validate(raw: DictConfig | dict, schema: Any, where: str) -> DictConfig:
    """Merge ``raw`` onto ``schema`` (a dataclass type or instance); unknown keys and bad types raise ConfigError."""
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, raw)
    except ConfigKeyError as err:
        full_key = err.full_key or str(err.key)
        parent = OmegaConf.select(base, full_key.rsplit(".", 1)[0]) if "." in full_key else base
        raise ConfigError(
            f"{where}: unknown key '{full_key}'.{_suggest(str(err.key), parent)} "
            "Fix the key in conf/ (then recompose params.yaml with `dvc exp run`) or in your -S override."
        ) from None
    except ValidationError as err:
        raise ConfigError(f"{where}: invalid value for '{err.full_key}': {err.msg}") from None


def load_params(path: str | Path = "params.yaml") -> DictConfig:
    """Read and validate ``params.yaml`` (the file DVC composed from ``conf/``)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found. Run from the repository root, or compose it with `dvc exp run`.")
    raw = OmegaConf.load(path)
    method = raw.pop("method", None)
    if method is None or "name" not in method:
        raise ConfigError(f"{path}: no method.name; pick a method group, e.g. `dvc exp run -S method=shortgpt`.")
    params = validate(raw, Params, where=str(path))
    with open_dict(params):
        params.method = method
    return params


def compose(conf_dir: str | Path = "conf", overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Compose ``conf/`` exactly as ``dvc exp run`` does before writing ``params.yaml``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
        cfg = hydra_compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)
