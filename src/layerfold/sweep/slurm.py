"""The comparison's run list on a SLURM cluster: one batch job per run, each a DVC experiment in its own workspace.

The local way is ``dvc exp run --queue`` then ``dvc queue start`` on one machine. Here every run of the
run list (:func:`layerfold.runs.plan.load_run_list`, composed and validated first exactly as the
local queue does) becomes an ``sbatch`` job that

1. clones the repository at the submitted commit into ``<workspaces>/<experiment>`` (``git clone
   --shared``: the clone borrows the repository's git objects instead of copying them);
2. points the clone at the one DVC cache every run shares (``dvc cache dir --local``; by default the
   repository's own), so an output computed by one run (the base model, the prepared data, a dense
   evaluation) is stored once and other runs restore it from the run cache instead of recomputing it;
3. runs ``dvc exp run -n <experiment> -S <override> ...`` there, as the local queue would;
4. pushes the experiment back to the repository (``dvc exp push --no-cache origin <experiment>``): its
   git ref and commit, with ``dvc.lock`` and every metrics file. The outputs are already in the shared
   cache (or, on a cluster without a shared file system, ``--dvc-remote`` pushes them to a DVC remote).

So the repository ends up with the same ``refs/exps`` the local queue leaves, and the comparison is
collected the same way (``scripts/runs.py collect``: ``dvc exp show --json --all-commits`` and
``git show <rev>:metrics/<file>.json``). The workspaces and the job logs must be on a file system the
compute nodes share with the submitting host (as the repository and cache must be).

Each job records how it ended in ``<workspaces>/<experiment>.status.json`` (exit code, job id, the
commit it ran): :func:`wait` reads those, so no SLURM accounting database is needed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layerfold.config import ConfigError
from layerfold.runs.plan import PlannedRun, RunList


class SweepError(RuntimeError):
    """A sweep that cannot be submitted or did not finish; the message says what and how to fix it."""


@dataclass(frozen=True)
class SlurmSettings:
    """Where the jobs run and what they need.

    ``sbatch_options`` go to every job (``--partition=gpu``, ``--gres=gpu:1``, ``--time=04:00:00``,
    ``--cpus-per-task=8``); ``setup`` lines run first in every job (``source .venv/bin/activate``,
    ``module load cuda``); the submitting environment is exported to the job too (sbatch's default).
    """

    workspaces: Path  # one clone per run and its log: on a file system the nodes share
    cache_dir: Path | None = None  # the DVC cache every run shares; None: the repository's own
    dvc_remote: str | None = None  # push outputs to this DVC remote too (clusters without a shared cache)
    sbatch_options: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    sbatch: str = "sbatch"


@dataclass
class SubmittedRun:
    name: str
    experiment: str
    job_id: str
    workspace: Path
    log: Path
    status_file: Path
    status: dict = field(default_factory=dict)


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode:
        raise SweepError(f"git {' '.join(args)} in {repo} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def repository_state(repo: Path) -> tuple[str, list[str]]:
    """The commit the runs start from (HEAD) and the tracked files changed since it (the jobs do not see them)."""
    commit = git(repo, "rev-parse", "HEAD")
    status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    return commit, changed


def default_cache_dir(repo: Path) -> Path:
    """The repository's DVC cache directory (what ``dvc cache dir`` prints there)."""
    done = subprocess.run(["dvc", "cache", "dir"], cwd=repo, capture_output=True, text=True)
    if done.returncode:
        raise SweepError(f"`dvc cache dir` in {repo} failed: {done.stderr.strip()}. Is {repo} a DVC repository?")
    return Path(done.stdout.strip()).resolve()


def _identity(repo: Path) -> list[tuple[str, str]]:
    """The repository's git identity: ``dvc exp run`` commits in the clone and reads it from git config."""
    pairs = []
    for key in ("user.name", "user.email"):
        done = subprocess.run(["git", "-C", str(repo), "config", key], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip():
            pairs.append((key, done.stdout.strip()))
    return pairs


def job_script(run_list: RunList, run: PlannedRun, repo: Path, commit: str, settings: SlurmSettings, cache_dir: Path,
               extra: Iterable[str] = (), force: bool = False) -> str:
    """The batch script of one run (see the module docstring for its steps)."""
    experiment = run_list.experiment(run)
    workspace = (settings.workspaces / experiment).resolve()
    status = workspace.with_name(f"{experiment}.status.json")
    log = workspace.with_name(f"{experiment}.log")
    q = shlex.quote
    options = [part for override in run_list.overrides(run, extra) for part in ("-S", override)]
    exp_run = ["dvc", "exp", "run", *(["-f"] if force else []), "-n", experiment, *options]
    push = ["dvc", "exp", "push", *(["-r", settings.dvc_remote] if settings.dvc_remote else ["--no-cache"]), "origin", experiment]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={experiment}",
        f"#SBATCH --output={log}",
        *(f"#SBATCH {option}" for option in settings.sbatch_options),
        "set -euo pipefail",
        # how the job ended, for `wait` (written on every exit, also after a failure)
        f"trap 'code=$?; printf \"{{\\\"exit_code\\\": %d, \\\"job_id\\\": \\\"%s\\\", \\\"commit\\\": \\\"{commit}\\\"}}\\n\" "
        f"$code \"${{SLURM_JOB_ID:-}}\" > {q(str(status))}.tmp && mv {q(str(status))}.tmp {q(str(status))}' EXIT",
        *settings.setup,
        f"rm -rf {q(str(workspace))}",
        f"git clone --quiet --shared --no-checkout {q(str(repo))} {q(str(workspace))}",
        f"cd {q(str(workspace))}",
        f"git checkout --quiet --detach {commit}",
        *(f"git config {key} {q(value)}" for key, value in _identity(repo)),
        f"dvc cache dir --local {q(str(cache_dir))}",
        shlex.join(exp_run),
        shlex.join(push),
    ]
    return "\n".join(lines) + "\n"


def submit(run_list: RunList, runs: Sequence[PlannedRun], repo: str | Path, settings: SlurmSettings, extra: Iterable[str] = (),
           force: bool = False, dry_run: bool = False) -> list[SubmittedRun]:
    """Submit one batch job per run (the runs were composed and validated by the caller); returns the jobs.

    With ``dry_run`` the scripts are written next to the workspaces and nothing is submitted.
    """
    repo = Path(repo).resolve()
    commit, changed = repository_state(repo)
    if changed:
        raise SweepError(f"{len(changed)} tracked file(s) changed since {commit[:10]} ({', '.join(changed[:5])}): the jobs run the "
                         "committed tree and would not see them. Commit them (or `git stash`) and submit again.")
    cache_dir = (settings.cache_dir or default_cache_dir(repo)).resolve()
    settings.workspaces.mkdir(parents=True, exist_ok=True)
    submitted = []
    for run in runs:
        experiment = run_list.experiment(run)
        workspace = (settings.workspaces / experiment).resolve()
        script = workspace.with_name(f"{experiment}.sbatch")
        status = workspace.with_name(f"{experiment}.status.json")
        status.unlink(missing_ok=True)
        script.write_text(job_script(run_list, run, repo, commit, settings, cache_dir, extra, force))
        job_id = "dry-run"
        if not dry_run:
            done = subprocess.run([settings.sbatch, "--parsable", str(script)], capture_output=True, text=True, cwd=settings.workspaces)
            if done.returncode:
                raise SweepError(f"sbatch {script} failed for run '{run.name}': {done.stderr.strip()}. The runs before it are "
                                 "submitted; fix this and submit the rest with --only.")
            job_id = done.stdout.strip().split(";")[0]
        submitted.append(SubmittedRun(run.name, experiment, job_id, workspace, workspace.with_name(f"{experiment}.log"), status))
    return submitted


def _queued(job_ids: list[str], squeue: str = "squeue") -> set[str]:
    """The jobs of ``job_ids`` SLURM still lists (pending, running or completing)."""
    done = subprocess.run([squeue, "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
    if done.returncode and "Invalid job id" not in done.stderr:
        raise SweepError(f"squeue failed: {done.stderr.strip()}")
    return {line.strip() for line in done.stdout.splitlines() if line.strip()}


def wait(runs: list[SubmittedRun], timeout: float, poll: float = 5.0, squeue: str = "squeue") -> list[SubmittedRun]:
    """Wait until every job has left the queue (or ``timeout`` seconds); read each one's status file.

    A job that left the queue without a status file was killed before its shell could write one
    (cancelled, out of time or memory): its status says so, and its log is named.
    """
    deadline = time.monotonic() + timeout
    pending = [r.job_id for r in runs]
    while pending:
        pending = sorted(_queued(pending, squeue))
        if not pending:
            break
        if time.monotonic() > deadline:
            raise SweepError(f"jobs {', '.join(pending)} still queued or running after {timeout:.0f} s; `squeue -j {','.join(pending)}`.")
        time.sleep(poll)
    for run in runs:
        for _ in range(10):  # the status file may lag the queue on a network file system
            if run.status_file.exists():
                break
            time.sleep(min(poll, 1.0))
        run.status = json.loads(run.status_file.read_text()) if run.status_file.exists() else {
            "exit_code": None, "job_id": run.job_id, "error": f"the job left the queue without writing {run.status_file} (cancelled, or "
                                                              f"killed for time or memory); see {run.log}"}
    return runs


def failures(runs: list[SubmittedRun]) -> list[str]:
    """One line per run that did not finish cleanly, naming its log."""
    return [f"{r.name} (job {r.job_id}): exit code {r.status.get('exit_code')}; log {r.log}"
            + (f"; {r.status['error']}" if "error" in r.status else "") for r in runs if r.status.get("exit_code") != 0]


def check_workspaces(path: str | Path) -> Path:
    """The workspaces folder, refused where a job could not write it (a relative path means the submit host's)."""
    path = Path(path).resolve()
    if re.search(r"\s", str(path)):
        raise ConfigError(f"--workspaces {path} contains whitespace, which SLURM's #SBATCH --output cannot hold; choose another folder.")
    return path
