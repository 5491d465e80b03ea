"""Queue the one-protocol comparison as DVC experiments, then collect the finished runs into a table, the
pairwise comparison and the depth plot.

    python scripts/comparison.py queue --dry-run                     # compose + validate every run, print the commands
    python scripts/comparison.py queue [--only shortgpt sleb] [--set eval.efficiency.enabled=false]
    dvc queue start -j 1 && dvc queue status                         # run them (dvc exp show lists every run)
    python scripts/comparison.py collect --out results/comparison/<tag>                       # from `dvc exp show`
    python scripts/comparison.py collect --out results/comparison/<tag> --exp-show exps.json  # a saved payload
    python scripts/comparison.py collect --out results/comparison/<tag> --methods-dir results/x  # run_methods folders

The run list is conf/comparison/smollm2.yaml (--runs); the logic is layerfold.report.comparison.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from layerfold.config import ConfigError
from layerfold.report.comparison import (
    check_runs, git_reader, load_run_list, queue_command, records_from_exp_show, records_from_methods_dir, write_comparison,
)

DEFAULT_RUNS = Path("conf/comparison/smollm2.yaml")
TITLE = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised): every method under one protocol"


def queue(args: argparse.Namespace) -> int:
    run_list = load_run_list(args.runs)
    runs = run_list.select(args.only)
    check_runs(run_list, runs, args.set)  # every run composes and validates before the queue is touched
    commands = [queue_command(run_list, run, args.set, args.force) for run in runs]
    print(f"{len(commands)} run(s) of {run_list.source} compose and validate", file=sys.stderr)
    for command in commands:
        print(shlex.join(command), flush=True)
        if not args.dry_run and subprocess.run(command).returncode != 0:
            print(f"error: queuing {command[command.index('-n') + 1]} failed; the runs before it are queued "
                  "(`dvc queue status`); fix it and re-run with --only for the rest.", file=sys.stderr)
            return 1
    return 0


def collect(args: argparse.Namespace) -> int:
    run_list = load_run_list(args.runs)
    if args.methods_dir is not None:
        records, unmatched = records_from_methods_dir(args.methods_dir, run_list)
        if unmatched:
            print(f"folders in {args.methods_dir} matching no run of {run_list.source} (left out): {', '.join(unmatched)}", file=sys.stderr)
    else:
        text = args.exp_show.read_text() if args.exp_show is not None else subprocess.run(
            ["dvc", "exp", "show", "--json", "--all-commits"], check=True, capture_output=True, text=True).stdout
        records = records_from_exp_show(json.loads(text), run_list, git_reader("."))
    written = write_comparison(args.out, run_list, records, TITLE)
    print(f"{len(records)} run(s) -> {args.out}/ (table.md, pairs.md, depth.json, depth.png, runs/)")
    if written["missing"]:
        print(f"not collected: {', '.join(written['missing'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="the run list (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("queue", help="compose and validate every run, then dvc exp run --queue each")
    q.add_argument("--only", nargs="+", default=[], metavar="NAME", help="queue only these runs")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run (repeatable)")
    q.add_argument("--dry-run", action="store_true", help="print the commands, queue nothing")
    q.add_argument("--force", action="store_true", help="replace experiments of the same name (dvc exp run -f)")
    c = commands.add_parser("collect", help="finished runs -> table.md, pairs.md, depth.json/png, runs/*.json")
    c.add_argument("--out", type=Path, required=True, help="e.g. results/comparison/<tag>")
    source = c.add_mutually_exclusive_group()
    source.add_argument("--exp-show", type=Path, default=None, help="a saved `dvc exp show --json --all-commits` (default: run it)")
    source.add_argument("--methods-dir", type=Path, default=None, help="a scripts/run_methods.py --out folder instead of DVC")
    args = parser.parse_args(argv)
    try:
        return queue(args) if args.command == "queue" else collect(args)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
