"""What every pipeline stage does first: report errors in one line, clean up after killed runs, read and check params, seed, find paths."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from layerfold.config import load_params
from layerfold.data.fingerprint import DATA_FILES  # noqa: F401  (a stage output path, listed with the others)
from layerfold.io import MissingFileError, install_error_hook, remove_stale_temps
from layerfold.models.facts import checkpoint_facts
from layerfold.models.sources import resolve_device, resolve_dtype
from layerfold.validation import check, check_runtime

# Fixed artifact locations: stable paths keep `dvc exp show` columns aligned across experiments.
BASE = Path("artifacts/base")
CAPTURE = Path("artifacts/capture")
COMPRESSED = Path("artifacts/compressed")
RECOVERED = Path("artifacts/recovered")
RECOVERY_STATE = Path("artifacts/recovery-state")  # resumable training checkpoints, removed on success
PREPARED = Path("data/prepared")
CALIBRATION = PREPARED / "calibration"
EVAL_DATA = PREPARED / "eval"
METRICS = Path("metrics")
REPORTS = Path("reports")
VALIDATED = Path("artifacts/validated.json")  # written by stage validate once params fit the model
# Where atomic writes put their temps: next to every stage output.
OUTPUT_FOLDERS = (Path("artifacts"), Path("data"), PREPARED, METRICS, REPORTS)


@dataclass
class Stage:
    name: str
    params: DictConfig
    device: torch.device
    dtype: torch.dtype


def start(name: str, params_path: str | Path = "params.yaml") -> Stage:
    # force=True: several stages may run in one process (scripts/run_methods.py), each with its own prefix.
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{name}] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A full disk, a damaged input or a bad setting ends the stage with one line that names the file and the fix.
    install_error_hook(name)
    for stale in remove_stale_temps(OUTPUT_FOLDERS):
        logging.info("removed %s, left behind by a killed run", stale)
    params = load_params(params_path)
    # Stages after `base` check the params against the model they will read. (DVC has already deleted
    # this stage's outputs; the `validate` stage ran the same check before any stage started.)
    check(params, checkpoint_facts(BASE) if name != "base" and (BASE / "config.json").exists() else None, str(params_path))
    check_runtime(params)
    seed = params.runtime.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = resolve_device(params.runtime.device)
    return Stage(name, params, device, resolve_dtype(params.runtime.dtype, device))


def expand(path: str | None) -> str | None:
    """Expand ``$VARS`` and ``~`` in a configured path at run time (params.yaml stays machine-free)."""
    if path is None:
        return None
    expanded = os.path.expanduser(os.path.expandvars(path))
    if "$" in expanded:
        raise MissingFileError(f"Path '{path}' uses an environment variable that is not set; export it first.")
    return expanded
