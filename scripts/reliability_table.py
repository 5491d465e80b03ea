"""The hostile-input suite's counts in docs/reliability.md, generated from a run of tests/failures/.

    python scripts/reliability_table.py           # run tests/failures/, rewrite the tables and docs/reliability_cases.json
    python scripts/reliability_table.py -m 'not slow'  # the same, the slow cases recorded as not run
    python scripts/reliability_table.py --check   # collect only: exit 1 when the cases differ from the recorded ones

Every test in ``tests/failures/`` is a case. Its class comes from ``@pytest.mark.hostile(input=..., stage=...,
expect=(...))`` on the test, its class or its module (``pytestmark``); the closest marker wins key by key.
A test without the marker is still counted, under input ``unmarked``, so no case in that folder goes uncounted;
``hostile(counted=False)`` leaves out the suite's own bookkeeping (the check that this table is current).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections import Counter
from datetime import date
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = "tests/failures"
DOC = REPO / "docs" / "reliability.md"
CASES = REPO / "docs" / "reliability_cases.json"
BEGIN, END = "<!-- reliability-table:begin (scripts/reliability_table.py writes this part) -->", "<!-- reliability-table:end -->"
INPUTS = ("config", "model", "data", "plan", "checkpoint", "environment", "unmarked")
EXPECTS = {
    "message": "fails with one message naming the file or key, what was expected and the fix",
    "no-partial": "leaves no half-written output and no temp",
    "intact": "deletes nothing DVC cannot restore (earlier outputs untouched)",
    "same-hashes": "the same inputs give byte-identical outputs",
    "traceback-for-bugs": "an unexpected error keeps its traceback",
}
VERDICTS = ("passed", "failed", "skipped", "xfailed", "xpassed", "not run")


class Collector:
    """A pytest plugin: each case's marker fields and its verdict."""

    def __init__(self) -> None:
        self.cases: dict[str, dict] = {}

    def pytest_itemcollected(self, item: pytest.Item) -> None:  # every case, also those `-m` deselects later
        fields: dict = {}
        for marker in item.iter_markers("hostile"):  # closest first
            for key, value in marker.kwargs.items():
                fields.setdefault(key, value)
        if fields.get("counted", True) is False:  # the suite's own bookkeeping, not a hostile input
            return
        expect = fields.get("expect", ())
        self.cases[item.nodeid] = {
            "input": fields.get("input", "unmarked"),
            "stage": fields.get("stage", "-"),
            "expect": [expect] if isinstance(expect, str) else list(expect),
            "verdict": "not run",
        }

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        case = self.cases.get(report.nodeid)
        if case is None:
            return
        if hasattr(report, "wasxfail"):
            verdict = "xfailed" if report.skipped else "xpassed"
        elif report.failed:
            verdict = "failed"
        elif report.skipped:
            verdict = "skipped"
        elif report.when == "call":
            verdict = "passed"
        else:
            return
        if case["verdict"] in ("not run", "passed"):  # a failed teardown after a passed call still fails the case
            case["verdict"] = verdict


def collect(run: bool, marks: str | None = None) -> dict[str, dict]:
    collector = Collector()
    os.chdir(REPO)
    # The stages' package first: tests/ also has a folder named pipeline/, which would otherwise shadow it
    # when every case runs in this one process.
    sys.path.insert(0, str(REPO))
    args = [SUITE, "-qq", "-p", "no:cacheprovider"] + ([] if run else ["--collect-only"]) + (["-m", marks] if marks else [])
    code = pytest.main(args, plugins=[collector])
    if code not in (0, 1, 5):  # 1: some case failed, which the table reports; 5: none selected  # 1: some case failed, which the table reports
        raise SystemExit(f"pytest exited {code} on {SUITE}")
    return collector.cases


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def tables(cases: dict[str, dict], when: str) -> str:
    verdicts = Counter(c["verdict"] for c in cases.values())
    lines = [
        f"Run of `{SUITE}/` on {when}: **{len(cases)} cases**, "
        + ", ".join(f"{verdicts[v]} {v}" for v in VERDICTS if verdicts[v]) + ".",
        "",
        "By input:",
        "",
        _row(["input", "cases", *VERDICTS, *EXPECTS]),
        _row(["---"] * (2 + len(VERDICTS) + len(EXPECTS))),
    ]
    for name in INPUTS:
        group = [c for c in cases.values() if c["input"] == name]
        if not group and name == "unmarked":
            continue
        counts = Counter(c["verdict"] for c in group)
        expects = Counter(e for c in group for e in c["expect"])
        lines.append(_row([name, len(group), *(counts[v] for v in VERDICTS), *(expects[e] for e in EXPECTS)]))
    lines += ["", "By stage (the first stage that meets the input; `any`: every stage's writes or reads):", "",
              _row(["stage", "cases", *VERDICTS]), _row(["---"] * (2 + len(VERDICTS)))]
    for stage in sorted({c["stage"] for c in cases.values()}):
        group = [c for c in cases.values() if c["stage"] == stage]
        counts = Counter(c["verdict"] for c in group)
        lines.append(_row([stage, len(group), *(counts[v] for v in VERDICTS)]))
    lines += ["", "Every case (parametrised cases counted under their test):", "",
              _row(["test", "input", "stage", "expect", "cases", "verdicts"]), _row(["---"] * 6)]
    by_test: dict[str, list[dict]] = {}
    for nodeid, case in sorted(cases.items()):  # the order of the recorded file, whatever the run's
        by_test.setdefault(nodeid.split("[")[0], []).append(case)
    for test, group in by_test.items():
        counts = Counter(c["verdict"] for c in group)
        first = group[0]
        lines.append(_row([f"`{test.removeprefix(SUITE + '/')}`", first["input"], first["stage"], ", ".join(first["expect"]) or "-",
                           len(group), ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])]))
    return "\n".join(lines)


def write(cases: dict[str, dict], when: str) -> None:
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{tables(cases, when)}\n{END}{tail}")
    CASES.write_text(json.dumps({"when": when, "cases": cases}, indent=1, sort_keys=True) + "\n")


def check() -> int:
    recorded = json.loads(CASES.read_text())["cases"]
    now = collect(run=False)
    strip = lambda cases: {k: {f: v for f, v in c.items() if f != "verdict"} for k, c in cases.items()}  # noqa: E731
    if strip(now) == strip(recorded):
        print(f"docs/reliability.md counts the {len(now)} cases of {SUITE}/")
        return 0
    added, gone = sorted(set(now) - set(recorded)), sorted(set(recorded) - set(now))
    changed = sorted(k for k in set(now) & set(recorded) if strip(now)[k] != strip(recorded)[k])
    print(f"docs/reliability.md is out of date: {len(added)} new, {len(gone)} removed, {len(changed)} reclassified cases "
          f"(e.g. {(added + gone + changed)[:3]}). Run `python scripts/reliability_table.py`.", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="collect only and compare with the recorded cases")
    parser.add_argument("-m", dest="marks", default=None, help="run only the cases this pytest mark expression selects "
                        "(the others count as 'not run'), e.g. 'not slow'")
    parser.add_argument("--when", default=None, help="what to say the run was (default: today's date and this machine's cores)")
    args = parser.parse_args()
    if args.check:
        return check()
    cases = collect(run=True, marks=args.marks)
    write(cases, args.when or f"{date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPU cores")
    print(f"wrote {DOC.relative_to(REPO)} and {CASES.relative_to(REPO)}: {len(cases)} cases")
    return 0


if __name__ == "__main__":
    from layerfold.io import install_error_hook

    install_error_hook("reliability_table")  # layerfold's errors as one line; --debug: the traceback
    raise SystemExit(main())
