"""Optional wandb tracking. DVC metrics files stay the source of truth; wandb only mirrors them.

``tracking.mode``: ``disabled`` (default, tests and CI), ``offline`` (local run files, `wandb sync`
later) or ``online``. Runs are named after the DVC experiment (``$DVC_EXP_NAME``) and carry the full
resolved config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

MODES = ("disabled", "offline", "online")


class _NoRun:
    def log(self, *_: Any, **__: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def run_dir(cfg: DictConfig) -> Path:
    """Where wandb writes its run folders (``<dir>/wandb/``): ``tracking.dir``, else ``$WANDB_DIR``, else the project
    root (``$DVC_ROOT`` under `dvc exp run`, else the working directory), whose ``/wandb/`` git ignores, so
    offline runs stay with the project (`wandb sync wandb/offline-run-*`) and out of commits."""
    configured = cfg.get("dir") or os.environ.get("WANDB_DIR")
    return Path(configured) if configured else Path(os.environ.get("DVC_ROOT") or Path.cwd())


def init_run(params: DictConfig, stage: str) -> Any:
    """Start a wandb run for ``stage`` (or a no-op stand-in when tracking is disabled)."""
    cfg = params.tracking
    if cfg.mode not in MODES:
        raise ValueError(f"tracking.mode must be one of {MODES}, got '{cfg.mode}'.")
    if cfg.mode == "disabled":
        return _NoRun()
    import wandb

    experiment = os.environ.get("DVC_EXP_NAME", "workspace")
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        mode=cfg.mode,
        dir=str(run_dir(cfg)),
        name=f"{experiment}-{stage}",
        group=experiment,
        job_type=stage,
        config=OmegaConf.to_container(params, resolve=True, throw_on_missing=True),
        reinit="finish_previous",
    )
