"""Compare experiments: one line each (model, method, layers, perplexities, average accuracy ± stderr,
difference to dense), at most 120 columns.

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
    args = parser.parse_args()
    dvc_json = None
    if args.dvc:
        dvc_json = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], check=True, capture_output=True, text=True).stdout
    archive = args.archive or (Path("reports/experiments") if not (args.methods_dir or args.dvc) else None)
    runs = load_runs(archive if archive is not None and archive.is_dir() else None, args.methods_dir, dvc_json)
    if not runs:
        sys.exit(f"no experiments found (archive {archive}, methods dirs {args.methods_dir}, dvc={args.dvc})")
    print("\n".join(format_rows(runs)))


if __name__ == "__main__":
    main()
