"""Runs side by side: list, tabulate and pair finished runs; queue a run list and collect it.

    python scripts/runs.py list [--dvc] [--methods-dir results/x]     # one line per run, <= 120 columns
    python scripts/runs.py table results/x [--reported]                # tables of a scripts/run_methods.py folder
    python scripts/runs.py pairs [--dvc] [--methods-dir results/x] [--layers 22]   # who is ahead, beyond the noise

    python scripts/runs.py queue --dry-run                             # compose + validate every run of the list
    python scripts/runs.py queue [--only shortgpt sleb] [--set eval.efficiency.enabled=false]
    dvc queue start -j 1 && dvc queue status                           # run them (dvc exp show lists every run)
    python scripts/runs.py collect --out results/comparison/<tag>      # from `dvc exp show` (or --exp-show, --methods-dir)
    python scripts/runs.py recompute --folder results/comparison/<tag> # again from its runs/*.json

Runs live in DVC experiments (and scripts/run_methods.py folders); every subcommand reads a run's headline
± se and its difference to dense ± se the way its report does (layerfold.report.reader.run_headline), so a
run shows the same numbers whatever else is listed. collect lists only runs that finished, each with numbers
its own commit's dvc.lock ties to it; failed, queued, running, never-run runs and runs whose numbers are
not their own are listed as such, without numbers. recompute rewrites a collected folder's tables, pairs,
findings and depth plot from its stored records under the current protocol; --task-data (a prepared
benchmarks folder, e.g. data/prepared/eval/benchmarks) computes each task's floor and gold answers for
records that predate stored answers (kept in task_facts.json).

The run list is conf/comparison/smollm2.yaml (--runs); the logic is layerfold.runs (run list, queue,
collect) and layerfold.report (listing, folder_tables, collected).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from layerfold.config import ConfigError
from layerfold.io import read_json
from layerfold.report.collected import load_task_facts, pairs_of_runs, tasks_of, write_comparison
from layerfold.report.folder_tables import cost_table, quality_table, reported_tables
from layerfold.report.listing import format_rows
from layerfold.runs.collect import git_reader, load_records, records_from_exp_show, records_from_methods_dir
from layerfold.runs.plan import check_runs, load_run_list, queue_command
from layerfold.runs.sources import dvc_experiments_json, load_runs

DEFAULT_RUNS = Path("conf/comparison/smollm2.yaml")
TITLE = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised): every method under one protocol"


def _setting(text: str) -> str | list[str]:
    return "auto" if text == "auto" else [t for t in text.split(",") if t]


def _read_runs(args: argparse.Namespace) -> list[dict]:
    """The runs of --methods-dir folders and of DVC (--exp-show, or --dvc; DVC's when nothing is named)."""
    use_dvc = args.dvc or args.exp_show is not None or not args.methods_dir
    dvc_json = (args.exp_show.read_text() if args.exp_show is not None else dvc_experiments_json()) if use_dvc else None
    runs = load_runs(args.methods_dir, dvc_json)
    if not runs:
        raise ValueError(f"no finished runs found (methods dirs {[str(d) for d in args.methods_dir]}, dvc={use_dvc})")
    return runs


def list_runs(args: argparse.Namespace) -> int:
    print("\n".join(format_rows(_read_runs(args), _setting(args.headline_tasks))))
    return 0


def pairs(args: argparse.Namespace) -> int:
    print(pairs_of_runs(_read_runs(args), _setting(args.headline_tasks), args.layers), end="")
    return 0


def table(args: argparse.Namespace) -> int:
    print("\n".join(quality_table(args.root, _setting(args.headline_tasks))))
    print()
    print("\n".join(cost_table(args.root)))
    if args.reported:
        print()
        print("\n".join(reported_tables(args.root)))
    return 0


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


def _facts(folder: Path | None, task_data: Path | None, records: list[dict]) -> dict | None:
    """Task facts from a prepared benchmarks folder (documents the records were scored on), else the folder's own."""
    if task_data is None:
        return load_task_facts(folder) if folder is not None and folder.is_dir() else None
    from layerfold.evaluation.task_configs import document_facts, write_task_configs

    settings = (records[0]["metrics"].get("dense") or {}).get("lm_eval_settings") or {}
    with tempfile.TemporaryDirectory() as task_dir:
        return document_facts(tasks_of(records), write_task_configs(task_data, Path(task_dir)), settings.get("limit"), settings.get("seed", 0))


def _report(written: dict, out: Path, count: int) -> None:
    print(f"{count} run(s) -> {out}/ (table.md, pairs.md, findings.md, depth.json, depth.png, runs/)")
    print(f"headline ({written['decision']['rule']}): {', '.join(written['decision']['tasks'])}; "
          f"excluded: {', '.join(e['task'] for e in written['decision']['excluded']) or 'none'}")
    for missing in written["missing"]:
        print(f"no numbers: {missing['run']} ({missing['state']}: {missing['reason']})")


def collect(args: argparse.Namespace) -> int:
    run_list = load_run_list(args.runs)
    missing = None
    if args.methods_dir is not None:
        records, unmatched = records_from_methods_dir(args.methods_dir, run_list)
        if unmatched:
            print(f"folders in {args.methods_dir} matching no run of {run_list.source} (left out): {', '.join(unmatched)}", file=sys.stderr)
    else:
        text = args.exp_show.read_text() if args.exp_show is not None else dvc_experiments_json()
        records, missing = records_from_exp_show(json.loads(text), run_list, git_reader("."), machine_dir=Path("metrics/timings"))
    if not records:
        raise ValueError(f"no finished run of {run_list.source} holds numbers of its own; nothing written to {args.out}")
    written = write_comparison(args.out, run_list, records, TITLE, missing, _setting(args.headline_tasks),
                               _facts(None, args.task_data, records))
    _report(written, args.out, len(records))
    return 0


def recompute(args: argparse.Namespace) -> int:
    folder = args.folder
    collected = read_json(folder / "runs.json")
    run_list = load_run_list(args.runs if args.runs != DEFAULT_RUNS else Path(collected.get("run_list") or DEFAULT_RUNS))
    records = load_records(folder)
    missing = [m for m in collected.get("missing", []) if isinstance(m, dict)] or None
    setting = _setting(args.headline_tasks) if args.headline_tasks is not None else collected.get("headline_setting", "auto")
    written = write_comparison(folder, run_list, records, TITLE, missing, setting, _facts(folder, args.task_data, records))
    _report(written, folder, len(records))
    return 0


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    main.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="the run list of queue/collect/recompute (default %(default)s)")
    commands = main.add_subparsers(dest="command", required=True)
    readers = {name: commands.add_parser(name, help=text) for name, text in (
        ("list", "one line per run (<= 120 columns): headline ± se, Δ vs dense ± se, flags"),
        ("pairs", "every two runs of the same depth: Δ ± se and who is ahead beyond the noise"))}
    for sub in readers.values():
        sub.add_argument("--methods-dir", type=Path, action="append", default=[], help="a scripts/run_methods.py --out folder (repeatable)")
        source = sub.add_mutually_exclusive_group()
        source.add_argument("--dvc", action="store_true", help="read `dvc exp show --json --all-commits` (the default without --methods-dir)")
        source.add_argument("--exp-show", type=Path, default=None, help="a saved `dvc exp show --json --all-commits`")
    readers["pairs"].add_argument("--layers", type=int, default=None, help="pair only runs whose final model has this many layers")
    t = commands.add_parser("table", help="quality and cost tables of a scripts/run_methods.py folder")
    t.add_argument("root", type=Path, help="a scripts/run_methods.py --out folder")
    t.add_argument("--reported", action="store_true", help="add measured-vs-reported tables for paper-preset runs")
    q = commands.add_parser("queue", help="compose and validate every run of the run list, then dvc exp run --queue each")
    q.add_argument("--only", nargs="+", default=[], metavar="NAME", help="queue only these runs")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run (repeatable)")
    q.add_argument("--dry-run", action="store_true", help="print the commands, queue nothing")
    q.add_argument("--force", action="store_true", help="replace experiments of the same name (dvc exp run -f)")
    c = commands.add_parser("collect", help="finished runs of the run list -> table.md, pairs.md, depth.json/png, runs/*.json")
    c.add_argument("--out", type=Path, required=True, help="e.g. results/comparison/<tag>")
    source = c.add_mutually_exclusive_group()
    source.add_argument("--exp-show", type=Path, default=None, help="a saved `dvc exp show --json --all-commits` (default: run it)")
    source.add_argument("--methods-dir", type=Path, default=None, help="a scripts/run_methods.py --out folder instead of DVC")
    r = commands.add_parser("recompute", help="a collected folder's tables, pairs, findings and plot again, from its runs/*.json")
    r.add_argument("--folder", type=Path, required=True, help="a folder collect wrote, e.g. results/comparison/<tag>")
    for sub, default in ((readers["list"], "auto"), (readers["pairs"], "auto"), (t, "auto"), (c, "auto"), (r, None)):
        sub.add_argument("--headline-tasks", default=default, metavar="auto|T1,T2",
                         help="auto (decided from the dense model, docs/protocol.md) or a fixed comma-separated task list")
    for sub in (c, r):
        sub.add_argument("--task-data", type=Path, default=None,
                         help="a prepared benchmarks folder (data/prepared/eval/benchmarks): each task's floor and gold answers "
                              "for records without stored answers")
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    commands = {"list": list_runs, "pairs": pairs, "table": table, "queue": queue, "collect": collect, "recompute": recompute}
    try:
        return commands[args.command](args)
    except (ConfigError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
