"""Compare experiments: one line each (model, method, layers, perplexities, headline accuracy ± stderr,
difference to dense, collapse/drift flags), at most 120 columns, under the headline rule it prints first.

    python scripts/compare.py                                   # the report's archive, reports/experiments/
    python scripts/compare.py --methods-dir results/x           # folders written by scripts/run_methods.py
    python scripts/compare.py --dvc                             # every `dvc exp show` experiment
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from layerfold.report.compare import format_rows, load_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=None, help="report.experiments_dir (default reports/experiments/ when no --methods-dir or --dvc is given)")
    parser.add_argument("--methods-dir", type=Path, action="append", default=[], help="a scripts/run_methods.py --out folder")
    parser.add_argument("--dvc", action="store_true", help="also read `dvc exp show --json --all-commits`")
    parser.add_argument("--headline-tasks", default="auto", metavar="auto|T1,T2",
                        help="auto (tasks the first run's dense model answers above chance and majority) or a fixed list")
    args = parser.parse_args()
    dvc_json = None
    if args.dvc:
        dvc_json = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], check=True, capture_output=True, text=True).stdout
    archive = args.archive or (Path("reports/experiments") if not (args.methods_dir or args.dvc) else None)
    runs = load_runs(archive if archive is not None and archive.is_dir() else None, args.methods_dir, dvc_json)
    if not runs:
        sys.exit(f"no experiments found (archive {archive}, methods dirs {args.methods_dir}, dvc={args.dvc})")
    setting = "auto" if args.headline_tasks == "auto" else [t for t in args.headline_tasks.split(",") if t]
    print("\n".join(format_rows(runs, setting)))


if __name__ == "__main__":
    main()
