"""The comparison's run list on a real single-node SLURM cluster (Debian's slurm-wlm + munge, started here on
localhost): two tiny stories260K runs submitted with ``scripts/sweep.py``, each a DVC experiment in its own clone
sharing the repository's DVC cache, pushed back into the repository and collected with ``scripts/runs.py
collect`` exactly as after the local queue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import data_dir, make_clone, models_dir  # noqa: E402
from slurm_cluster import INSTALL, LocalSlurm, missing_binaries  # noqa: E402

from layerfold.runs.plan import load_run_list  # noqa: E402
from layerfold.sweep.slurm import SlurmSettings, SweepError, job_script, submit  # noqa: E402

TINY = [
    "model=stories260k", "data.calibration.num_blocks=4", "data.calibration.seq_len=32", "data.benchmarks=[arc_easy]",
    "eval.perplexity.datasets=[wikitext2]", "eval.perplexity.seq_len=64", "eval.perplexity.max_windows=1", "eval.lm_eval.tasks=[arc_easy]", "eval.lm_eval.limit=2",
    "eval.lm_eval.batch_size=2", "eval.efficiency.enabled=false",
]
RUN_LIST = {
    "experiment_prefix": "slurm-",
    "common": TINY,
    "compare_at": 2,
    "runs": {
        "drop-last": {"overrides": ["method=drop_last", "method.num_remove=2"], "remove": 2},
        "shortgpt": {"overrides": ["method=shortgpt", "method.num_remove=2"], "remove": 2, "curve": "shortgpt"},
    },
}


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM binaries not installed ({', '.join(missing)}); install them with `{INSTALL}`")
    # one CPU: the two jobs run one after the other, so the second finds the first's stages in the shared cache
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm")).start(cpus=1)
    yield slurm
    slurm.stop()


@pytest.fixture(scope="module")
def swept(cluster, tmp_path_factory) -> tuple[Path, dict, Path, str]:
    """The repository clone after both jobs ran and were collected; also the job log text."""
    if not (data_dir().is_dir() and (models_dir() / "stories260K").is_dir()):
        pytest.skip("local datasets/models folders not present")
    base = tmp_path_factory.mktemp("sweep")
    repo, env = make_clone(base / "repo")
    env = {**env, **cluster.env, "OMP_NUM_THREADS": "1"}
    runs = base / "runs.yaml"  # outside the repository: the run list is read by the submitting host only
    runs.write_text(yaml.safe_dump(RUN_LIST))
    workspaces = base / "ws"
    out = run([sys.executable, "scripts/sweep.py", "--runs", str(runs), "submit", "--workspaces", str(workspaces),
               "--sbatch-option=--cpus-per-task=1", "--wait", "1200"], repo, env, timeout=1500)
    logs = "\n".join(f"==> {p.name} <==\n{p.read_text(errors='replace')}" for p in sorted(workspaces.glob("*.log")))
    print(out + "\n" + logs)
    run([sys.executable, "scripts/runs.py", "--runs", str(runs), "collect", "--out", str(base / "collected")], repo, env)
    return repo, env, base, out + logs


def test_both_runs_ran_as_slurm_jobs_and_landed_as_experiments_of_the_repository(swept):
    repo, env, base, log = swept
    assert log.count("job ") >= 2 and "2 of 2 run(s) finished" in log
    for name in ("drop-last", "shortgpt"):
        status = json.loads((base / "ws" / f"slurm-{name}.status.json").read_text())
        assert status["exit_code"] == 0 and status["job_id"]
        assert status["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env)
    assert sum(ref.endswith(("/slurm-drop-last", "/slurm-shortgpt")) for ref in refs.split()) == 2
    shown = run(["dvc", "exp", "show", "--json"], repo, env)
    assert "slurm-drop-last" in shown and "slurm-shortgpt" in shown


def test_the_runs_share_one_dvc_cache(swept):
    """Both clones point at the repository's cache; the second job restores the stages the first computed with the
    same inputs (the base model, the data, the dense capture and evaluation) from it instead of running them."""
    repo, env, base, _ = swept
    cache = run(["dvc", "cache", "dir"], repo, env).strip()
    for name in ("drop-last", "shortgpt"):
        assert run(["dvc", "cache", "dir"], base / "ws" / f"slurm-{name}", env).strip() == cache
    assert not any((base / "ws" / f"slurm-{name}" / ".dvc" / "cache").exists() for name in ("drop-last", "shortgpt"))
    first, second = ((base / "ws" / f"slurm-{name}.log").read_text() for name in ("drop-last", "shortgpt"))
    for stage in ("base", "data", "capture"):
        assert f"Running stage '{stage}'" in first
        assert f"Stage '{stage}' is cached - skipping run" in second, stage
    # evaluate writes its per-document answers as a plain `cache: false` output, and DVC keeps no run-cache entry for
    # a stage with one (dvc.stage.Stage.run): the dense evaluation runs again in the second job, to the same numbers.
    assert "Running stage 'evaluate@dense'" in second
    assert "Running stage 'compress'" in second  # the method differs: computed


def test_collect_reads_the_slurm_runs_as_it_reads_the_local_queue(swept):
    _, _, base, _ = swept
    collected = base / "collected"
    order = json.loads((collected / "runs.json").read_text())["order"]
    assert order == ["drop-last", "shortgpt"]
    for name in order:
        record = json.loads((collected / "runs" / f"{name}.json").read_text())
        assert record["source"] == "dvc experiment" and record["experiment"] == f"slurm-{name}"
        compressed = record["metrics"]["compressed"]
        assert compressed["lm_eval"]["arc_easy"]["acc"] is not None
        assert len(compressed["lm_eval"]["arc_easy"].get("per_doc", compressed["lm_eval"]["arc_easy"].get("docs", [0, 0]))) >= 1
    assert (collected / "table.md").read_text().count("|") > 10


# -- without a cluster -------------------------------------------------------------------------------------------------
def test_the_job_script_clones_runs_and_pushes_the_experiment(tmp_path):
    runs = tmp_path / "runs.yaml"
    runs.write_text(yaml.safe_dump(RUN_LIST))
    run_list = load_run_list(runs)
    settings = SlurmSettings(workspaces=tmp_path / "ws", sbatch_options=("--gres=gpu:1",), setup=("source .venv/bin/activate",))
    script = job_script(run_list, run_list.runs[1], tmp_path / "repo", "abc123", settings, tmp_path / "cache", ["eval=gpu"])
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH --job-name=slurm-shortgpt" in lines
    order = [next(i for i, line in enumerate(lines) if line.startswith(prefix)) for prefix in
             ("source .venv", "git clone --quiet --shared", "git checkout --quiet --detach abc123", "dvc cache dir --local",
              "dvc exp run", "dvc exp push --no-cache origin slurm-shortgpt")]
    assert order == sorted(order)
    exp_run = next(line for line in lines if line.startswith("dvc exp run"))
    # common, then --set, then the run's own overrides: the order the local queue uses
    assert exp_run.index("model=stories260k") < exp_run.index("eval=gpu") < exp_run.index("method=shortgpt")


def test_a_changed_tracked_file_is_refused_before_anything_is_submitted(tmp_path):
    repo, _ = make_clone(tmp_path / "repo")
    (repo / "README.md").write_text("changed\n")
    runs = tmp_path / "runs.yaml"
    runs.write_text(yaml.safe_dump(RUN_LIST))
    run_list = load_run_list(runs)
    with pytest.raises(SweepError, match=r"README.md.*Commit them"):
        submit(run_list, run_list.runs, repo, SlurmSettings(workspaces=tmp_path / "ws", sbatch="false"))
    assert not list((tmp_path / "ws").glob("*.sbatch")) if (tmp_path / "ws").exists() else True
