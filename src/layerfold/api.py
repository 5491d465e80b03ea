"""layerfold from Python: compress and recover a model without stage paths, params.yaml or DVC.

    from layerfold import compress, recover      # layerfold.api

    model, plan = compress("path/to/checkpoint", method="sleb", num_remove=4)         # conf/method/sleb.yaml + settings
    model, plan = compress(model, tokenizer=tok, method="shortgpt", calibration=blocks, out="shallow/")
    model, summary = recover(model, teacher, plan, recovery="distill", train=train, val=val, max_steps=100)

Each call composes the same configuration as the pipeline (``conf/`` with Hydra, the group chosen by
``method=`` / ``recovery=``, keyword settings inside that group, ``overrides`` for anything else in
Hydra's ``key=value`` form), checks it with :func:`layerfold.validation.check` against the model's config
(the ``validate`` stage's check, before any work), and then calls the functions the ``compress`` and
``recover`` stages call: :class:`layerfold.methods.MethodContext` with
:func:`layerfold.compensate.compress_and_compensate`, and :class:`layerfold.recovery.RecoveryEngine`.
The model is resident (``hardware=sequential`` belongs to the stages, which read checkpoints layer by layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerfold.config import ConfigError, compose, parse_params

CONF = Path(__file__).resolve().parents[2] / "conf"


def settings(group: str, name: str, overrides: list[str] | tuple[str, ...] = (), **values: Any) -> DictConfig:
    """The checked params the pipeline would run with ``{group}={name}``, ``{group}.<key>=<value>`` for each keyword
    and the Hydra ``overrides`` (e.g. ``["data.calibration.num_blocks=32"]``)."""
    from omegaconf import OmegaConf

    from hydra.errors import MissingConfigException

    dotted = [f"{group}.{key}={_hydra_value(value)}" for key, value in values.items()]
    if not (CONF / group / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        raise ConfigError(f"Unknown {group} '{name}'. Choose one of {', '.join(known)} ({group}={name!r}).")
    try:
        composed = compose(CONF, [f"{group}={name}", *dotted, *overrides])
    except MissingConfigException as err:  # a group option in ``overrides`` that conf/ does not have
        raise ConfigError(f"layerfold.api: {err}") from err
    return parse_params(OmegaConf.create(composed), f"layerfold.api ({group}={name})")


def _hydra_value(value: Any) -> str:
    """A Python value as Hydra's override grammar reads it (None -> null, lists in brackets)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


def _check(params: DictConfig, model: PreTrainedModel, where: str) -> None:
    """The validate stage's checks of what this call runs, against the model in hand (its config, not its weights)."""
    from layerfold.models.facts import facts_from_config
    from layerfold.validation import check_for_model

    check_for_model(params, facts_from_config(model.config), where)


def compress(model_or_path: PreTrainedModel | str | Path, method: str = "shortgpt", *, tokenizer: PreTrainedTokenizerBase | None = None,
             calibration: torch.Tensor | None = None, out: str | Path | None = None, device: str | torch.device = "cpu",
             storage_dtype: torch.dtype | None = None, overrides: list[str] | tuple[str, ...] = (), **method_settings: Any) -> tuple[PreTrainedModel, dict]:
    """Compress a model with ``method`` (a registered name; ``method_settings`` override ``conf/method/<method>.yaml``).

    ``model_or_path``: a loaded causal LM (edited in place; pass ``tokenizer``) or a checkpoint folder (loaded on ``device``
    in ``runtime.dtype``). ``calibration``: ``[num_blocks, seq_len]`` token ids; None builds them from ``data.calibration``
    as the ``data`` stage does (local corpora). ``out``: also save the checkpoint with its sealed ``plan.json`` there, in
    ``storage_dtype`` (None: the model's own dtype; the stage uses ``model.storage_dtype`` of its preset).
    Returns ``(model, plan)``, the plan being what ``plan.json`` holds.
    """
    from layerfold.compensate import compress_and_compensate
    from layerfold.methods import MethodContext
    from layerfold.models.sources import load_checkpoint, resolve_dtype

    params = settings("method", method, overrides, **method_settings)
    device = torch.device(device)
    if isinstance(model_or_path, (str, Path)):
        model, tokenizer = load_checkpoint(model_or_path, device, resolve_dtype(params.runtime.dtype, device))
    else:
        model = model_or_path
        if tokenizer is None:
            raise ConfigError("layerfold.api.compress: pass tokenizer= with a loaded model (or pass the checkpoint's path instead).")
    _check(params, model, f"layerfold.api.compress(method={method})")
    if calibration is None:
        from layerfold.data.calibration import build_calibration

        calibration, _ = build_calibration(params.data.calibration, tokenizer, params.data.local_dir)
    ctx = MethodContext(model, tokenizer, calibration, None, batch_size=params.capture.batch_size, seed=params.runtime.seed)
    plan = compress_and_compensate(ctx, params.method, params.get("compensate"))
    if out is not None:
        from layerfold.io import read_json
        from layerfold.models.sources import PLAN_FILE, save_checkpoint

        save_checkpoint(model, tokenizer, out, dtype=storage_dtype, plan=plan)
        plan = read_json(Path(out) / PLAN_FILE)  # as written: sealed to the checkpoint
    return model, plan


def recover(student: PreTrainedModel, teacher: PreTrainedModel | None, plan: dict, recovery: str = "distill", *,
            tokenizer: PreTrainedTokenizerBase | None = None, train: torch.Tensor | None = None, val: torch.Tensor | None = None,
            overrides: list[str] | tuple[str, ...] = (), progress: bool = True,
            **recovery_settings: Any) -> tuple[PreTrainedModel, dict]:
    """Heal ``student`` (the compressed model, with the ``plan`` :func:`compress` returned) towards ``teacher`` (the dense
    model) with ``recovery`` (``conf/recovery/<recovery>.yaml``; ``recovery_settings`` override it).

    ``train`` / ``val``: ``[n, seq_len]`` token ids; None builds both from ``recovery.data`` as the ``recover`` stage does
    (needs ``tokenizer``). Returns ``(model, summary)`` as :meth:`layerfold.recovery.RecoveryEngine.run` does.
    """
    from layerfold.recovery import RecoveryEngine

    params = settings("recovery", recovery, overrides, **recovery_settings)
    params.method = plan["method"]  # the method that made the student (judged against the dense model), not conf/'s default
    _check(params, teacher if teacher is not None else student, f"layerfold.api.recover(recovery={recovery})")
    if params.recovery.name == "none":
        return student, {"recovery": "none", "trained": False}
    if train is None or val is None:
        if tokenizer is None:
            raise ConfigError("layerfold.api.recover: pass train= and val= token blocks, or tokenizer= to build them from recovery.data.")
        from layerfold.data.training import build_training_data

        train, val, _ = build_training_data(params.recovery.data, tokenizer, params.data.local_dir)
    engine = RecoveryEngine(student, teacher, plan, params.recovery, train, val, progress=progress)
    return engine.run()
