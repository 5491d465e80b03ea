"""The pipeline under `dvc repro` on stories260K: bad settings stop before anything is deleted, a killed
stage is redone alone and leaves no temp behind, outputs hash the same in every clone and as committed,
a second `dvc repro` in the same clone is refused while the first runs, and a killed queue worker leaves
the experiment queue usable."""

from __future__ import annotations

import json
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
from stage_runner import TINY  # stories260K through the default pipeline's settings

pytestmark = pytest.mark.hostile(input="config", stage="validate", expect=("message", "intact"))

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


# The same, but the write waits for a gate file (announcing itself with <gate>.reached) instead of a
# fixed time: the test decides when the stage goes on, wherever DVC runs it (workspace or queue temp dir).
GATED_SAVE = """
import os
import sys
if "pipeline.compress" in getattr(sys, "orig_argv", []) and os.environ.get("LAYERFOLD_TEST_GATE"):
    import time
    import transformers

    _save = transformers.PreTrainedModel.save_pretrained

    def _gated_save(self, *args, **kwargs):
        _save(self, *args, **kwargs)
        gate = os.environ["LAYERFOLD_TEST_GATE"]
        open(gate + ".reached", "w").close()
        deadline = time.monotonic() + 600
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.1)

    transformers.PreTrainedModel.save_pretrained = _gated_save
"""
# dvc.lock's output hashes of the stages through compress for TINY on stories260K, as committed; set
# LAYERFOLD_UPDATE_HASHES=1 to rewrite them after a change that is meant to change an output.
EXPECTED_HASHES = Path(__file__).with_name("stories260k_hashes.json")
DETERMINISTIC = ("validate", "data_files", "base", "data", "capture", "compress")


def run(cmd: list[str], cwd: Path, env: dict, ok: bool | None = True) -> str:
    """``cmd``'s output; ``ok``: whether it must succeed (True), fail (False) or either (None)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert ok is None or (proc.returncode == 0) == ok, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}"
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


@pytest.mark.hostile(input="environment", stage="compress", expect=("same-hashes",))
def test_tiny_default_reproduces_the_committed_hashes(clone):
    """Every deterministic stage through compress writes the bytes recorded in the repository: an install
    whose library versions change an output (a version string, a tokenizer file, a float) fails here."""
    import json
    import os

    repo, _ = clone
    hashes = {stage: lock_outs(repo, stage) for stage in DETERMINISTIC}
    if os.environ.get("LAYERFOLD_UPDATE_HASHES"):
        EXPECTED_HASHES.write_text(json.dumps(hashes, indent=2) + "\n")
    expected = json.loads(EXPECTED_HASHES.read_text())
    for stage in DETERMINISTIC:
        assert hashes[stage] == expected[stage], (
            f"stage {stage} wrote other bytes than committed; if the change is meant, rerun with LAYERFOLD_UPDATE_HASHES=1")
    config = json.loads((repo / "artifacts" / "base" / "config.json").read_text())
    assert "transformers_version" not in config and "dtype" in config


def gated(env: dict, tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose compress stage waits at its checkpoint write until the returned gate file exists."""
    (tmp_path / "hook").mkdir(exist_ok=True)
    (tmp_path / "hook" / "sitecustomize.py").write_text(GATED_SAVE)
    gate = tmp_path / "gate"
    return {**env, "PYTHONPATH": f"{tmp_path / 'hook'}:{env.get('PYTHONPATH', '')}", "LAYERFOLD_TEST_GATE": str(gate)}, gate


def wait_for(path: Path, proc: subprocess.Popen | None = None, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc is None or proc.poll() is None, f"the gated process ended ({proc.returncode}) before reaching the gate"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.hostile(input="environment", stage="any", expect=("message", "intact"))
def test_second_repro_in_the_same_clone_is_refused(clone, tmp_path):
    repo, env = clone
    params = yaml.safe_load((repo / "params.yaml").read_text())
    changed = {**params, "method": {**params["method"], "num_remove": 3}}
    (repo / "params.yaml").write_text(yaml.safe_dump(changed))
    slow, gate = gated(env, tmp_path)
    first = subprocess.Popen(["dvc", "repro", "compress"], cwd=repo, env=slow, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(Path(f"{gate}.reached"), first)
        out = run(["dvc", "repro", "compress"], repo, env, ok=False)
        assert "is busy, it is being blocked by" in out or "Unable to acquire lock" in out, out[-2000:]
        assert "Running stage 'compress'" not in out
    finally:
        gate.touch()
        first_out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, first_out[-3000:]
    status = run(["dvc", "status", "compress"], repo, env)
    assert "up to date" in status, status  # every output as dvc.lock says: nothing half-written, nothing lost
    assert json.loads((repo / "metrics/compress.json").read_text())["layers_after"] == 2 and not temps(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run(["dvc", "repro", "compress"], repo, env)


def _kill_processes_under(folder: Path) -> int:
    """SIGKILL every process whose working directory is inside ``folder`` (the queue worker and its stage)."""
    import psutil

    killed = 0
    for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
        try:
            cwd = proc.info["cwd"]
            if proc.pid != os.getpid() and cwd and Path(cwd).resolve().is_relative_to(folder.resolve()):
                proc.kill()
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue
    return killed


@pytest.mark.slow
@pytest.mark.hostile(input="environment", stage="any", expect=("intact",))
def test_killed_queue_worker_leaves_the_queue_usable(clone, tmp_path):
    repo, env = clone
    slow, gate = gated(env, tmp_path)
    workspace = run(["git", "status", "--porcelain", "--untracked-files=no"], repo, env)
    # `dvc exp run -S` composes params.yaml from conf/ again: the tiny settings go with every queued run
    tiny = [arg for override in TINY if override != "method.num_remove=2" for arg in ("-S", override)]
    run(["dvc", "exp", "run", "--queue", "compress", *tiny, "-S", "method.num_remove=1", "-n", "killed"], repo, env)
    # Not through run(): the worker daemon inherits a captured stdout and would hold the call until it exits.
    subprocess.run(["dvc", "queue", "start"], cwd=repo, env=slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    try:
        wait_for(Path(f"{gate}.reached"))  # the worker is inside compress, half-way through its write
    finally:
        assert _kill_processes_under(repo) >= 2  # the worker and the stage at least
    run(["dvc", "exp", "run", "--queue", "compress", *tiny, "-S", "method.num_remove=3", "-n", "after-kill"], repo, env)
    run(["dvc", "queue", "start"], repo, env)
    deadline = time.monotonic() + 300
    while True:
        status = run(["dvc", "queue", "status"], repo, env)
        row = next((line for line in status.splitlines() if "after-kill" in line), "")
        if "Success" in row or "Failed" in row:
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert "Success" in row, run(["dvc", "queue", "logs", "after-kill"], repo, env, ok=None)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    runs = {exp["name"]: rev for entry in shown for exp in entry.get("experiments") or [] for rev in exp.get("revs") or []}
    metrics = runs["after-kill"]["data"]["metrics"]["metrics/compress.json"]["data"]
    assert metrics["layers_after"] == 2
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], repo, env) == workspace  # the workspace untouched
    # the dead task still reads Running; `dvc queue kill` finds its process gone and marks it Failed, to be removed
    run(["dvc", "queue", "kill", "killed"], repo, env)
    status = run(["dvc", "queue", "status"], repo, env)
    assert "Failed" in next(line for line in status.splitlines() if "killed" in line), status
    run(["dvc", "queue", "remove", "--failed"], repo, env)
    assert "killed" not in run(["dvc", "queue", "status"], repo, env)


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


@pytest.mark.hostile(input="environment", stage="compress", expect=("no-partial", "intact"))
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


@pytest.mark.hostile(input="data", stage="data_files", expect=("same-hashes",))
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


@pytest.mark.hostile(input="environment", stage="data", expect=("same-hashes",))
def test_two_clones_at_different_paths_hash_the_same(clone, tmp_path_factory):
    repo, env = clone
    other, other_env = make_tiny_clone(tmp_path_factory.mktemp("second-clone-at-another-path") / "elsewhere")
    run(["dvc", "repro", "data"], other, other_env)
    for stage in ("validate", "data_files", "base", "data"):
        assert lock_outs(other, stage) == lock_outs(repo, stage), stage
