"""Submit the comparison's run list to SLURM: one batch job per run, each a DVC experiment in its own clone
sharing one DVC cache; the experiments are pushed back into this repository, so the usual collect reads them.

    python scripts/sweep.py submit --workspaces /shared/layerfold-runs --sbatch-option=--gres=gpu:1 \
        --sbatch-option=--time=04:00:00 --setup 'source .venv/bin/activate' [--only shortgpt sleb] [--wait]
    python scripts/sweep.py submit --workspaces DIR --dry-run       # write the job scripts, submit nothing
    python scripts/runs.py collect --out results/comparison/<tag>   # as after the local queue

The run list is conf/comparison/smollm2.yaml (--runs), composed and validated before anything is submitted;
the library is layerfold.sweep.slurm (what each job does is in its docstring).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layerfold.config import ConfigError
from layerfold.runs.plan import check_runs, load_run_list
from layerfold.sweep.slurm import SlurmSettings, SweepError, check_workspaces, failures, submit, wait

DEFAULT_RUNS = Path("conf/comparison/smollm2.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="the run list (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("submit", help="compose and validate every run, then sbatch one job per run")
    s.add_argument("--workspaces", required=True, help="one clone per run, its job script, log and status (shared with the nodes)")
    s.add_argument("--cache-dir", type=Path, help="the DVC cache every run shares (default: this repository's)")
    s.add_argument("--dvc-remote", help="also push each run's outputs to this DVC remote (no shared cache)")
    s.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION", help="e.g. --sbatch-option=--gres=gpu:1 (repeatable)")
    s.add_argument("--setup", action="append", default=[], metavar="LINE", help="a shell line each job runs first (repeatable)")
    s.add_argument("--only", nargs="+", default=[], metavar="NAME", help="submit only these runs")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run (repeatable)")
    s.add_argument("--force", action="store_true", help="replace experiments of the same name (dvc exp run -f)")
    s.add_argument("--dry-run", action="store_true", help="write the job scripts, submit nothing")
    s.add_argument("--wait", type=float, default=None, metavar="SECONDS", help="wait up to this long for the jobs to end")
    args = parser.parse_args(argv)
    try:
        run_list = load_run_list(args.runs)
        runs = run_list.select(args.only)
        check_runs(run_list, runs, args.set)  # every run composes and validates before anything is submitted
        settings = SlurmSettings(workspaces=check_workspaces(args.workspaces), cache_dir=args.cache_dir, dvc_remote=args.dvc_remote,
                                 sbatch_options=tuple(args.sbatch_option), setup=tuple(args.setup))
        jobs = submit(run_list, runs, Path.cwd(), settings, args.set, args.force, args.dry_run)
        for job in jobs:
            print(f"{job.name}: job {job.job_id}, experiment {job.experiment}, log {job.log}", flush=True)
        if args.wait is None or args.dry_run:
            return 0
        bad = failures(wait(jobs, args.wait))
        for line in bad:
            print(f"failed: {line}", file=sys.stderr)
        print(f"{len(jobs) - len(bad)} of {len(jobs)} run(s) finished; collect with `python scripts/runs.py collect --out ...`")
        return 1 if bad else 0
    except (ConfigError, SweepError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
