"""Run a pipeline stage (or a snippet) in a fresh process, as DVC would, optionally under a file-size limit
or on a small filesystem, and read back what it said: the hostile-input tests check the message a person
sees, which only a separate process shows (the one-line error hook, the exit status)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from conftest import REPO, data_dir, models_dir

# stories260K through the default pipeline's settings, small enough for seconds per stage
TINY = [
    "model=stories260k",
    "data.calibration.num_blocks=8",
    "data.calibration.seq_len=64",
    "data.benchmarks=[arc_easy]",
    "eval.lm_eval.tasks=[arc_easy]",  # the tasks must read prepared benchmarks (validate checks it)
    "method.num_remove=2",
    "eval.perplexity.seq_len=128",
]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        """stderr without the stages' log lines and progress bars: what is left is the error report."""
        return [line for line in self.stderr.splitlines()
                if line.strip() and not (line[:2].isdigit() and line[2:3] == ":") and "it/s]" not in line and "%|" not in line]


def env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), str(REPO / "tests")]),
        "LAYERFOLD_DATA_DIR": str(data_dir()),
        "LAYERFOLD_MODELS_DIR": str(models_dir()),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def write_params(workdir: Path, overrides: list[str] = ()) -> dict:
    from layerfold.config import compose

    params = compose(REPO / "conf", [*TINY, *overrides])
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run(args: list[str], workdir: Path, *, file_size_limit: int | None = None, timeout: int = 300, **extra_env: str) -> Result:
    """``python <args>`` in ``workdir``; ``file_size_limit`` sets RLIMIT_FSIZE (bytes per file) for that process only."""
    proc = subprocess.run([sys.executable, *args], cwd=workdir, env=env(**extra_env), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limit_file_size(file_size_limit) if file_size_limit is not None else None)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def stage(name: str, workdir: Path, **kwargs) -> Result:
    return run(["-m", f"pipeline.{name}"], workdir, **kwargs)


def small_filesystem_available() -> bool:
    """Whether this machine lets a process mount a private tmpfs (a user and mount namespace of its own)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp && true"], capture_output=True)
    return probe.returncode == 0


def run_on_small_filesystem(args: list[str], workdir: Path, size: str, seed: dict[str, bytes], timeout: int = 300,
                            read_only: bool = False) -> Result:
    """``python <args>`` in a tmpfs of ``size`` holding ``seed`` (relative path -> bytes), remounted read-only
    when ``read_only``.

    The mount lives in the process's own namespaces: it is gone when the process ends, whatever happens.
    Afterwards ``workdir`` holds a copy of what was left on the small filesystem (under ``after/``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    staging = workdir / "seed"
    after = workdir / "after"
    for rel, content in seed.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(content)
    after.mkdir(exist_ok=True)
    mount = workdir / "small"
    mount.mkdir(exist_ok=True)
    command = " && ".join([
        f"mount -t tmpfs -o size={size} tmpfs {mount}",
        f"cp -a {staging}/. {mount}/",
        *([f"mount -o remount,ro {mount}"] if read_only else []),
        f"cd {mount}",
        f"({' '.join(map(_quote, [sys.executable, *args]))}; echo $? > {workdir}/code)",
        f"cp -a {mount}/. {after}/",
    ])
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], env=env(), capture_output=True, text=True, timeout=timeout)
    code = int((workdir / "code").read_text()) if (workdir / "code").exists() else proc.returncode
    return Result(code, proc.stdout, proc.stderr)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def temps(folder: Path) -> list[Path]:
    """Leftover atomic-write temps anywhere under ``folder``."""
    return [p for p in folder.rglob(".*.tmp-*")]
