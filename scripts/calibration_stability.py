"""Calibration stability: every training-free method on K calibration draws; chosen layers and loss spread.

    python scripts/calibration_stability.py --out results/calibration_stability/smollm2-135m-q4_1_cpu \\
        --only shortgpt gromov sleb laco-paper laco-code mka-paper mka-parity streamline-none come
    python scripts/calibration_stability.py --out <dir> --entry replaceme:method=replaceme   # any method, by overrides
    python scripts/calibration_stability.py --out <dir> --only sleb --draws-for sleb=3        # fewer draws for one method
    python scripts/calibration_stability.py --out <dir> --report-only                          # table from finished draws
    python scripts/calibration_stability.py --out <dir> --only shortgpt --plans-only            # chosen layers only, no losses

Methods come from the run list (``--runs``, its entries' overrides; the list's ``common`` is not applied:
``-o`` sets overrides for every run, e.g. ``-o eval=gpu``) and from ``--entry NAME:OVERRIDE,...``. Draw
``s`` is the entry composed with ``data.calibration.seed=s``. The stages run through the pipeline's own
entry points in folders under ``<out>/work/`` (never the DVC workspace; git ignores that folder): the base
checkpoint once, each draw's blocks and dense statistics once for every method, each (method, draw)
once; a killed run continues where it stopped. ``<out>/<method>.json`` and ``<out>/table.md`` are rewritten
after every (method, draw). The logic is :mod:`layerfold.report.stability`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the pipeline/ package beside scripts/

from omegaconf import OmegaConf  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from layerfold.config import ConfigError, compose, parse_params  # noqa: E402
from layerfold.io import atomic_file, read_json  # noqa: E402
from layerfold.runs.plan import load_run_list, model_facts  # noqa: E402
from layerfold.report.stability import (  # noqa: E402
    MethodEntry, StabilityRunner, Stages, method_result, parse_entry, replace_generated, report_markdown, run_context, write_results,
)
from layerfold.validation import check  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The held-out set: the C4 calibration half (conf/data/c4.yaml), which no WikiText-2 draw reads.
HELD_OUT = ("data.calibration.source=c4", "data.calibration.chunking=per_document", "data.calibration.seed=0")


def composer(conf: Path):
    """Overrides -> composed params, checked as the validate stage checks them (the model's facts read once)."""
    facts: dict[str, object] = {}
    composed: dict[tuple[str, ...], dict] = {}  # Hydra's composition takes ~0.3 s; the runner asks for the same params often

    def run(overrides: list[str]) -> dict:
        if tuple(overrides) not in composed:
            params = compose(conf, overrides)
            parsed = parse_params(params, f"overrides {overrides}")
            key = OmegaConf.to_yaml(parsed.model)
            if key not in facts:
                facts[key] = model_facts(parsed.model)
            check(parsed, facts[key], f"overrides {overrides}")
            composed[tuple(overrides)] = params
        return copy.deepcopy(composed[tuple(overrides)])

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder; the working files go to <out>/work/")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default <out>/work)")
    parser.add_argument("--runs", type=Path, default=REPO / "conf/comparison/smollm2.yaml", help="run list the entries come from")
    parser.add_argument("--only", nargs="*", default=[], help="run-list entries to run, in this order (default: all, unless --entry)")
    parser.add_argument("--entry", action="append", default=[], help="NAME:OVERRIDE[,OVERRIDE...]: a method not in the run list")
    parser.add_argument("-o", "--override", action="append", default=[], help="Hydra override for every run (after the run list's, before the seed)")
    parser.add_argument("--draws", type=int, default=5, help="K: draws per method, data.calibration.seed = 0..K-1")
    parser.add_argument("--draws-for", action="append", default=[], metavar="NAME=K", help="fewer draws for one method (too slow)")
    parser.add_argument("--held-out", nargs="*", default=list(HELD_OUT), help="overrides that make a draw the common held-out set")
    parser.add_argument("--conf", type=Path, default=REPO / "conf")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the results from finished draws")
    parser.add_argument("--plans-only", action="store_true",
                        help="compress and keep the plans of the draws not yet run, measure nothing (the chosen layers at the cost of "
                             "the compress stage alone); a later run without it measures them")
    parser.add_argument("--doc", type=Path, default=None, help="also put the table into this Markdown file, between its markers")
    args = parser.parse_args()

    if args.draws < 1:
        parser.error(f"--draws={args.draws}: at least 1")
    entries: list[MethodEntry] = []
    try:
        if args.only or not args.entry:
            run_list = load_run_list(args.runs)
            entries += [MethodEntry(run.name, tuple(run.overrides)) for run in run_list.select(args.only)]
        entries += [parse_entry(text) for text in args.entry]
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"two entries share a name: {names}; results are written per name")
        draws_for = {}
        for item in args.draws_for:
            name, _, k = item.partition("=")
            if name not in names or not k.isdigit() or not 1 <= int(k) <= args.draws:
                raise ConfigError(f"--draws-for {item!r}: NAME=K with NAME one of {names} and 1 <= K <= --draws ({args.draws})")
            draws_for[name] = int(k)
        if args.doc is not None:
            replace_generated(args.doc.read_text(), "")  # the markers are there, before hours of work
        compose_checked = composer(args.conf.resolve())
        for entry in entries:  # every entry composes and validates before anything runs
            compose_checked([*args.override, *entry.overrides, "data.calibration.seed=0"])
            compose_checked([*args.override, *entry.overrides, *args.held_out])
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from pipeline import base, capture, compress, data

    work = args.work or args.out / "work"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ".gitignore").write_text("/work/\n")
    bar = tqdm(total=sum(draws_for.get(e.name, args.draws) for e in entries), unit="run", desc="method x draw", dynamic_ncols=True)
    runner = StabilityRunner(work, Stages(base.main, data.main, capture.main, compress.main), compose_checked, tuple(args.override),
                             tuple(args.held_out), progress=lambda message: (bar.set_postfix_str(message[:60]), tqdm.write(f"== {message}")),
                             measure_draws=not (args.plans_only or args.report_only))
    records: dict[str, list[dict]] = {e.name: [] for e in entries}

    def report() -> None:
        done = [e for e in entries if records[e.name]]
        if not done:
            return
        results = [method_result(e.name, e.overrides, records[e.name], draws_for.get(e.name, args.draws)) for e in done]
        first = records[done[0].name][0]
        params = compose_checked([*args.override, *done[0].overrides, f"data.calibration.seed={first['seed']}"])
        held_out = compose_checked([*args.override, *done[0].overrides, *args.held_out])
        context = run_context(params, held_out, read_json(runner.base(params) / "source.json"), [r for e in done for r in records[e.name]],
                              list(range(args.draws)), args.override, args.held_out)
        write_results(args.out, results, context)
        if args.doc is not None:
            with atomic_file(args.doc) as handle:
                handle.write(replace_generated(args.doc.read_text(), report_markdown(results, context, title=False)))

    # Every method's first draw first (a timing of each, in --only's order: put the slow ones last), then the
    # other draws method by method, so the cheap methods finish while the slow ones still run.
    order = sorted(entries, key=lambda e: args.only.index(e.name) if e.name in args.only else len(args.only))
    jobs = [(0, e) for e in order] + [(seed, e) for e in order for seed in range(1, draws_for.get(e.name, args.draws))]
    for seed, entry in jobs:
        done = (work / "runs" / entry.name / f"seed-{seed}" / "result.json").exists()
        if args.report_only and not done:
            bar.update(1)
            continue
        bar.set_description(f"{entry.name} draw {seed}")
        records[entry.name].append(runner.run_draw(entry, seed))
        bar.update(1)
        report()
    bar.close()
    report()
    print(f"results: {args.out}/table.md and one JSON per method")
    return 0


if __name__ == "__main__":
    sys.exit(main())
