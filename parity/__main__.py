"""``python -m parity fetch|run|summary``: the seed methods' parity with their released code (see the package)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import parity
from parity.orchestrate import _parse_git_dirs, add_worker_command, run_parity, run_side, work, write_summary
from parity.released import DEFAULT_RELEASED_DIR, METHODS, RELEASED, REPO, ReleasedCodeMissing, fetch_released, released_path
from parity.runner import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m parity", description=parity.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    fetch = commands.add_parser("fetch", help="copy the pinned released files into --released-dir")
    run = commands.add_parser("run", help="fetch if needed, run both sides of every method, compare, write results")
    for p in (fetch, run):
        p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
        p.add_argument("--released-dir", default=str(DEFAULT_RELEASED_DIR), help="outside this repository (default %(default)s)")
        p.add_argument("--git-dir", action="append", default=[], metavar="OWNER/NAME=PATH",
                       help="a local git copy of a released repository, used instead of cloning over the network")
    run.add_argument("--checkpoint", default="artifacts/base", help="HF checkpoint directory (default %(default)s)")
    run.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--num-remove", type=int, default=8, help="layers fewer at the end (shortgpt, mka, come)")
    run.add_argument("--blocks", type=int, default=32, help="calibration blocks (pipeline default 32)")
    run.add_argument("--seq-len", type=int, default=256, help="calibration block length (pipeline default 256)")
    run.add_argument("--batch-size", type=int, default=4, help="layerfold's capture batch (pipeline default 4)")
    run.add_argument("--data-dir", default=os.environ.get("LAYERFOLD_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    run.add_argument("--mka-memoise", action=argparse.BooleanOptionalAction, default=None,
                     help="memoise MKA's repeated forwards (default: on for CPU, off for CUDA)")
    run.add_argument("--override", action="append", default=[], metavar="METHOD:KEY=VALUE",
                     help="extra conf override for layerfold's side, e.g. laco:method.add_bos=false")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads in every process (default: torch's)")
    run.add_argument("--repeats", type=int, default=1, help="timed runs per side, each in a fresh process (median reported)")
    run.add_argument("--tolerance", type=float, default=1e-6, help="max abs weight difference that still passes")
    run.add_argument("--out", default="results/parity")

    summary = commands.add_parser("summary", help="rewrite <out>/summary.md from the JSON files there")
    summary.add_argument("--out", default="results/parity")

    add_worker_command(commands, METHODS)
    args = parser.parse_args()

    if args.command == "fetch":
        git_dirs = _parse_git_dirs(args.git_dir)
        for method in args.methods:
            try:
                record = fetch_released(method, Path(args.released_dir), git_dirs.get(RELEASED[method].repo))
            except ReleasedCodeMissing as err:
                raise SystemExit(str(err)) from None
            print(f"{method}: {record['repo']} @ {record['commit']} in {released_path(Path(args.released_dir), method)}")
    elif args.command == "summary":
        write_summary(Path(args.out))
    elif args.command == "run":
        if args.mka_memoise is None:
            args.mka_memoise = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
        run_parity(args)
    else:
        work(args, Settings, run_side)


if __name__ == "__main__":
    from layerfold.io import install_error_hook

    install_error_hook("parity")  # layerfold's errors (a bad override, a missing file) as one line; --debug: the traceback
    main()
