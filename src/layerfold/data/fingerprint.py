"""Which local data files a configuration reads, and their sha256: the data directory as a DVC dependency.

The data directory is configured by ``data.local_dir`` or ``$LAYERFOLD_DATA_DIR``, which DVC cannot see.
The ``data_files`` stage runs on every ``dvc repro`` and writes this fingerprint; the ``data`` stage
depends on it, so pointing the directory at different files re-runs ``data`` while an identical copy
elsewhere does not. Paths are relative to the data directory, so every clone writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from layerfold.data.benchmarks import BENCHMARKS, source_files
from layerfold.data.text import CALIBRATION_SOURCES, ENV_VAR, LOCAL_FILES, data_dir
from layerfold.io import MissingFileError, file_sha256

DATA_FILES = Path("data/local_files.json")  # written by the data_files stage, a dependency of data

EVAL_CORPORA = ("wikitext2_test", "c4")  # what the data stage prepares for perplexity


def required_files(cfg: DictConfig) -> list[str]:
    """Files (relative to the data directory) that the ``data`` stage reads for ``data`` config ``cfg``."""
    corpus = CALIBRATION_SOURCES.get(cfg.calibration.source, cfg.calibration.source)
    names = {"c4" if corpus.startswith("c4") else corpus, *EVAL_CORPORA}
    files = [LOCAL_FILES[name] for name in sorted(names) if name in LOCAL_FILES]
    for task in cfg.benchmarks:
        if task not in BENCHMARKS:
            raise ValueError(f"data.benchmarks: unknown benchmark '{task}'; choose from {', '.join(BENCHMARKS)}.")
        files.extend(source_files(task))
    return sorted(set(files))


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """``{"local_dir": bool, "files": {relative path: sha256}}`` for the data ``cfg`` reads.

    Raises FileNotFoundError naming the first missing file and how to fix it, before any stage that
    would read it runs.
    """
    root = data_dir(cfg.local_dir)
    if root is None:  # hub mode: the datasets library pins what it downloads
        return {"local_dir": False, "files": {}}
    files = {}
    for rel in required_files(cfg):
        path = root / rel
        if not path.is_file():
            raise MissingFileError(
                f"Local dataset file {rel} is missing from the data directory {root}. Copy it there, point "
                f"data.local_dir or ${ENV_VAR} at a folder that has it, or drop the benchmark that needs it "
                "from data.benchmarks."
            )
        files[rel] = file_sha256(path)
    return {"local_dir": True, "files": files}
