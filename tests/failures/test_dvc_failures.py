"""The pipeline under `dvc repro` on stories260K: bad settings stop before anything is deleted, a killed
stage is redone alone and leaves no temp behind, and outputs hash the same in every clone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import data_dir, make_clone, models_dir

TINY = [
    "model=stories260k",
    "data.calibration.num_blocks=8",
    "data.calibration.seq_len=64",
    "data.benchmarks=[arc_easy]",
    "eval.lm_eval.tasks=[arc_easy]",  # the tasks must read prepared benchmarks (validate checks it)
    "method.num_remove=2",
    "eval.perplexity.seq_len=128",  # stories260K's context is 512 tokens
]
# A sitecustomize that makes the compress stage's checkpoint write hang after the weights are on disk,
# so the test can kill it mid-write. Only the compress stage's process is affected.
SLOW_SAVE = """
import sys
if "pipeline.compress" in getattr(sys, "orig_argv", []):
    import time
    import transformers

    _save = transformers.PreTrainedModel.save_pretrained

    def _slow_save(self, *args, **kwargs):
        _save(self, *args, **kwargs)
        time.sleep(600)

    transformers.PreTrainedModel.save_pretrained = _slow_save
"""


def run(cmd: list[str], cwd: Path, env: dict, ok: bool = True) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def make_tiny_clone(dest: Path) -> tuple[Path, dict]:
    dest, env = make_clone(dest)
    run([sys.executable, "scripts/compose_params.py", *TINY], dest, env)
    return dest, env


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    if not (data_dir().is_dir() and (models_dir() / "stories260K").is_dir()):
        pytest.skip("local datasets/models folders not present")
    repo, env = make_tiny_clone(tmp_path_factory.mktemp("first") / "repo")
    run(["dvc", "repro", "compress"], repo, env)
    return repo, env


def lock_outs(repo: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return {out["path"]: out["md5"] for out in lock["outs"]}


def temps(repo: Path) -> list[Path]:
    return [p for folder in ("artifacts", "data", "data/prepared", "metrics") for p in (repo / folder).glob(".*.tmp-*")]


def test_bad_value_stops_repro_before_any_output_is_deleted(clone):
    repo, env = clone
    params = yaml.safe_load((repo / "params.yaml").read_text())
    before = {p: (repo / p).stat().st_mtime_ns for p in ("artifacts/capture/stats.json", "metrics/compress.json")}
    broken = {**params, "capture": {"batch_size": 0}, "method": {**params["method"], "name": "foo"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(broken))
    try:
        started = time.perf_counter()
        out = run(["dvc", "repro", "compress"], repo, env, ok=False)
        assert "capture.batch_size=0 is not allowed: it must be >= 1" in out or "Unknown method 'foo'" in out
        assert "Running stage 'capture'" not in out and "Running stage 'compress'" not in out
        assert {p: (repo / p).stat().st_mtime_ns for p in before} == before  # untouched, not re-created
        assert time.perf_counter() - started < 120
    finally:
        (repo / "params.yaml").write_text(yaml.safe_dump(params))


def test_misspelt_exp_run_key_gets_a_layerfold_message(clone):
    repo, env = clone
    out = run(["dvc", "exp", "run", "-S", "method.num_remvoe=6"], repo, env, ok=False)
    assert "Unknown setting 'method.num_remvoe'" in out and "Did you mean 'method.num_remove'" in out
    assert "To append to your config use +" not in out


def test_sigkill_mid_write_then_rerun_redoes_only_that_stage(clone, tmp_path):
    repo, env = clone
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["method"]["num_remove"] = 1  # compress must run again; nothing upstream changes
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "sitecustomize.py").write_text(SLOW_SAVE)
    slow_env = {**env, "PYTHONPATH": f"{tmp_path}:{env.get('PYTHONPATH', '')}"}

    proc = subprocess.Popen(["dvc", "repro", "compress"], cwd=repo, env=slow_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((repo / "artifacts").glob(".compressed.tmp-*/model.safetensors")):
            assert proc.poll() is None, "compress finished before it could be killed"
            assert time.monotonic() < deadline, "compress never started writing"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert temps(repo), "the kill should have left the half-written temp behind"

    shutil.rmtree(repo / "artifacts" / "capture")  # an earlier stage's output, restored from the cache
    out = run(["dvc", "repro", "compress"], repo, env)
    assert "Running stage 'compress'" in out
    for stage in ("base", "data", "capture"):
        assert f"Running stage '{stage}'" not in out, out
    assert (repo / "artifacts/capture/stats.safetensors").exists()
    assert not temps(repo), temps(repo)
    assert (repo / "artifacts/compressed/config.json").exists()


def test_data_directory_content_is_a_dependency(clone, tmp_path):
    repo, env = clone
    copy = tmp_path / "elsewhere"
    for rel in yaml.safe_load((repo / "data/local_files.json").read_text())["files"]:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(data_dir() / rel, copy / rel)
    moved = {**env, "LAYERFOLD_DATA_DIR": str(copy)}
    out = run(["dvc", "repro", "data"], repo, moved)
    assert "Running stage 'data'" not in out  # the same files at another path: nothing to do

    train = copy / "wikitext-2-raw-train-excerpt/wikitext2_train_5k.txt"
    train.write_text(train.read_text()[: len(train.read_text()) // 2])
    out = run(["dvc", "repro", "data"], repo, moved)
    assert "Running stage 'data'" in out
    run(["dvc", "repro", "data"], repo, env)  # back to the shared data for the other tests


def test_two_clones_at_different_paths_hash_the_same(clone, tmp_path_factory):
    repo, env = clone
    other, other_env = make_tiny_clone(tmp_path_factory.mktemp("second-clone-at-another-path") / "elsewhere")
    run(["dvc", "repro", "data"], other, other_env)
    for stage in ("validate", "data_files", "base", "data"):
        assert lock_outs(other, stage) == lock_outs(repo, stage), stage
