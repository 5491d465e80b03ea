"""Run every registered benchmark on this machine and collect their records into one table.

    python benchmarks/run.py --suite gpu                       # every GPU benchmark, one after the other
    python benchmarks/run.py --suite cpu --only layer_removal_speed
    python benchmarks/run.py --table benchmarks/results/latest_nvidia-h100-80gb-hbm3.json   # Markdown to stdout

Each benchmark is a script in ``benchmarks/`` run as its own subprocess (``SUITES`` below: name ->
command template and time limit), from the repository root, writing its record to a temporary
``--out`` that is moved to ``<out-dir>/<name>_<device>.json`` only when the script succeeds, so a
failed run never leaves a stale result behind. A script that does not exist is reported as missing,
one that fails or overruns its limit as such (with the tail of its log, whole logs in
``<out-dir>/logs/``); the others still run. The collected records go to
``<out-dir>/latest_<device>.json`` and a Markdown table ``<out-dir>/latest_<device>.md``.

A record is ``{"benchmark", "environment", "settings", "rows": [...], "notes"}`` with rows from
``benchmarks/common.row``. Older result files without ``rows`` are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
LOG_TAIL = 2000  # characters of a failed script's output kept in the collected record


@dataclass(frozen=True)
class Benchmark:
    """A script in ``benchmarks/`` and its arguments; ``{out}`` in them is replaced by the result path."""

    command: str
    timeout_s: int = 600


# Arguments as each script's module docstring describes them. GPU entries read artifacts/base
# (SmolLM2-135M: `dvc repro base`) and data/prepared (`dvc repro data`); each is meant to finish in
# under 8 minutes on one H100, except eval_breakdown's before/after pair over the full task sets.
SUITES: dict[str, dict[str, Benchmark]] = {
    "gpu": {
        "layer_removal_speed": Benchmark("layer_removal_speed.py --checkpoint artifacts/base --remove 8 --out {out}", 600),
        "layer_removal_speed_8b": Benchmark(
            "layer_removal_speed.py --shape llama3-8b --remove 8 --settings 1x128:32,8x512:128 --out {out}", 600),
        "capture_speed": Benchmark("capture_speed.py --max-distance 8 --out {out}", 600),
        "capture_dots": Benchmark("capture_dots.py --out {out}", 300),
        "sequential_trials": Benchmark("sequential_trials.py --shape llama3-70b --out {out}", 600),
        "sequential_distill": Benchmark("sequential_distill.py --shape llama3-70b --out {out}", 600),
        "sequential_70b": Benchmark(
            "sequential_70b.py --shape llama3-70b --windows 16 --seq-len 2048 --calib 16x2048 --out {out}", 600),
        "mka_similarity": Benchmark("mka_similarity.py --checkpoint artifacts/base --device cuda --out {out}", 600),
        "sleb_search": Benchmark("sleb_search.py --checkpoint artifacts/base --out {out}", 600),
        "eval_breakdown": Benchmark("eval_breakdown.py --model artifacts/base --mode both --out {out}", 1800),
    },
    "cpu": {
        "layer_removal_speed": Benchmark("layer_removal_speed.py --checkpoint artifacts/base --remove 8 --threads 1 --out {out}", 600),
        "layer_removal_speed_tiny": Benchmark("layer_removal_speed.py --shape tiny --remove 2 --threads 1 --out {out}", 300),
        "capture_speed": Benchmark("capture_speed.py --shape tiny --tokens 4x64 --max-distance 2 --out {out}", 300),
        "capture_dots": Benchmark("capture_dots.py --tokens 256 --hidden 64 --slots 3 9 --repeats 3 --out {out}", 300),
        "sequential_trials": Benchmark("sequential_trials.py --shape tiny --out {out}", 300),
        "sequential_distill": Benchmark("sequential_distill.py --shape tiny --out {out}", 300),
        "sequential_70b": Benchmark("sequential_70b.py --shape tiny --windows 2 --seq-len 64 --calib 2x64 --out {out}", 300),
        "mka_similarity": Benchmark("mka_similarity.py --checkpoint artifacts/base --skip-sklearn --out {out}", 1200),
        "sleb_search": Benchmark("sleb_search.py --shape tiny --out {out}", 300),
        "eval_breakdown": Benchmark("eval_breakdown.py --tiny artifacts/base --limit 50 --out {out}", 1200),
        # on CUDA it needs two GPUs (nvidia-h200-x2 class): run it there by hand, see its docstring
        "recovery_multi_gpu": Benchmark("recovery_multi_gpu.py --tiny --out {out}", 600),
    },
}


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``; any CPU -> ``"cpu"``."""
    if name.lower().startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ------------------------------------------------------------------------------------------------
# running


def run_one(name: str, benchmark: Benchmark, out_dir: Path, slug: str, scripts_dir: Path = BENCHMARKS,
            timeout_s: int | None = None) -> dict[str, Any]:
    """Run one benchmark script; return its entry ``{name, status, command, seconds, ..., record}``.

    status: ``ok`` | ``missing`` (no such script) | ``failed`` (non-zero exit) | ``timeout`` |
    ``no_record`` (exited 0 without writing a JSON record).
    """
    out_dir = Path(out_dir).resolve()  # the script runs from the repository root
    result_path = out_dir / f"{name}_{slug}.json"
    script, *_ = shlex.split(benchmark.command)
    entry: dict[str, Any] = {"name": name, "command": f"python benchmarks/{benchmark.command.format(out=result_path)}"}
    if not (scripts_dir / script).is_file():
        return {**entry, "status": "missing", "detail": f"{scripts_dir / script} does not exist"}
    limit = timeout_s or benchmark.timeout_s
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out_dir) as scratch:
        scratch_out = Path(scratch) / result_path.name
        args = [sys.executable, str(scripts_dir / script), *shlex.split(benchmark.command.format(out=scratch_out))[1:]]
        started = time.perf_counter()
        try:
            done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as expired:
            log = _text(expired.stdout) + _text(expired.stderr)
            _write_log(out_dir, name, slug, log)
            return {**entry, "status": "timeout", "seconds": round(time.perf_counter() - started, 1),
                    "detail": f"ran past its {limit} s limit", "log_tail": log[-LOG_TAIL:]}
        seconds = round(time.perf_counter() - started, 1)
        log = done.stdout + done.stderr
        _write_log(out_dir, name, slug, log)
        entry.update(seconds=seconds, returncode=done.returncode)
        if done.returncode != 0:
            return {**entry, "status": "failed", "detail": f"exit code {done.returncode}: {_last_line(log)}", "log_tail": log[-LOG_TAIL:]}
        if not scratch_out.is_file():
            return {**entry, "status": "no_record", "detail": f"exited 0 without writing {result_path.name}", "log_tail": log[-LOG_TAIL:]}
        try:
            record = json.loads(scratch_out.read_text())
        except json.JSONDecodeError as error:
            return {**entry, "status": "no_record", "detail": f"its JSON does not parse: {error}", "log_tail": log[-LOG_TAIL:]}
        shutil.move(scratch_out, result_path)
    return {**entry, "status": "ok", "result_file": str(result_path), "record": record}


def _last_line(log: str) -> str:
    """The last non-empty line of a log (usually the error), shortened for a table note."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _write_log(out_dir: Path, name: str, slug: str, log: str) -> None:
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    (out_dir / "logs" / f"{name}_{slug}.log").write_text(log)


def run_suite(benchmarks: Mapping[str, Benchmark], out_dir: Path, slug: str, scripts_dir: Path = BENCHMARKS,
              timeout_s: int | None = None) -> list[dict[str, Any]]:
    """Run the benchmarks one after the other (they time things: never two at once)."""
    entries = []
    for name, benchmark in benchmarks.items():
        print(f"[run] {name}: python benchmarks/{benchmark.command}", flush=True)
        entry = run_one(name, benchmark, out_dir, slug, scripts_dir, timeout_s)
        print(f"[run] {name}: {entry['status']}" + (f" ({entry['detail']})" if entry.get("detail") else "")
              + (f" in {entry['seconds']} s" if "seconds" in entry else ""), flush=True)
        entries.append(entry)
    return entries


# ------------------------------------------------------------------------------------------------
# the table

COLUMNS = ["benchmark", "row", "shape", "tokens", "seconds median [min–max]", "tokens/s", "MFU", "peak GPU MiB (×weights)",
           "peak host MiB", "target", "met"]


def _num(value: Any, spec: str) -> str:
    return "—" if value is None or isinstance(value, bool) else format(value, spec)


def _cells(benchmark: str, record: Mapping[str, Any], r: Mapping[str, Any]) -> list[str]:
    seconds = "—" if r.get("seconds") is None else f"{r['seconds']:.4g} [{_num(r.get('seconds_min'), '.4g')}–{_num(r.get('seconds_max'), '.4g')}]"
    gpu = _num(r.get("peak_gpu_mib"), ",.0f") + (f" (×{r['peak_gpu_over_weights']:.2f})" if r.get("peak_gpu_over_weights") else "")
    met = "—" if r.get("met") is None else ("yes" if r["met"] else "**no**")
    shape = r.get("shape") or (record.get("settings") or {}).get("shape") or "—"
    mfu = "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
    return [benchmark, str(r.get("name", "—")), str(shape), _num(r.get("tokens"), ",d"), seconds, _num(r.get("tokens_per_s"), ",.1f"),
            mfu, gpu, _num(r.get("peak_host_mib"), ",.0f"), str(r.get("target") or "—"), met]


def markdown(records: list[Mapping[str, Any]], skipped: Iterable[str] = (), title: str = "Benchmarks",
             environment: Mapping[str, Any] | None = None) -> str:
    """One table over every row of ``records``, then what is not in it and each benchmark's notes. The
    header's date and device are the records' own (or ``environment``'s, where the run itself is known)."""
    environments = [environment] if environment else [rec.get("environment") or {} for rec in records]
    devices = sorted({str(e.get("device")) for e in environments if e.get("device")})
    dates = sorted({str(e.get("date")) for e in environments if e.get("date")})
    lines = [f"# {title}", "", f"date: {', '.join(dates) or '—'}; device: {', '.join(devices) or '—'}", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for rec in records:
        for r in rec.get("rows") or []:
            name = str(rec.get("entry") or rec.get("benchmark", "?"))
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in _cells(name, rec, r)) + " |")
    skipped = list(skipped)
    if skipped:
        lines += ["", "Not in the table:", "", *(f"- {note}" for note in skipped)]
    notes = [(rec.get("entry") or rec.get("benchmark"), rec.get("notes")) for rec in records if rec.get("notes")]
    if notes:
        lines += ["", "Notes:", "", *(f"- **{name}**: {note}" for name, note in notes)]
    return "\n".join(lines) + "\n"


def split_entries(entries: list[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Records with rows, and one note for every entry that has none (missing, failed, old layout)."""
    records, skipped = [], []
    for entry in entries:
        record = entry.get("record")
        if entry["status"] != "ok":
            skipped.append(f"{entry['name']}: {entry['status']} ({entry.get('detail', '')})")
        elif not isinstance(record, dict) or "rows" not in record:
            skipped.append(f"{entry['name']}: old-style record without rows, skipped")
        else:
            records.append({**record, "entry": entry["name"]})  # the suite's name: one script can run as several entries
    return records, skipped


def load_for_table(paths: Iterable[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Records from benchmark JSON files or collected ``latest_*.json`` files; old-style files are noted."""
    records, skipped = [], []
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            skipped.append(f"{path}: unreadable ({error})")
            continue
        if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
            more, notes = split_entries(data["benchmarks"])
            records += more
            skipped += [f"{path.name}: {note}" for note in notes]
        elif isinstance(data, dict) and "rows" in data:
            records.append(data)
        else:
            skipped.append(f"{path}: old-style result without rows, skipped")
    return records, skipped


# ------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--suite", choices=sorted(SUITES), help="run this suite's benchmarks")
    action.add_argument("--table", nargs="+", type=Path, metavar="FILE", help="print a Markdown table of these JSON files and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks of the suite")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=int, help="seconds per benchmark, instead of each one's own limit")
    parser.add_argument("--device-slug", help="name of the result files (default: from this machine's device)")
    args = parser.parse_args(argv)

    if args.table:
        records, skipped = load_for_table(args.table)
        print(markdown(records, skipped), end="")
        return 0

    suite = SUITES[args.suite]
    unknown = sorted(set(args.only or []) - set(suite))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: not in the {args.suite} suite; choose from {', '.join(sorted(suite))}.")
    chosen = {name: b for name, b in suite.items() if not args.only or name in args.only}

    sys.path.insert(0, str(BENCHMARKS))
    from common import environment  # torch and layerfold: only when running, not for --table

    from layerfold.io import atomic_file, write_json
    from layerfold.models import resolve_device
    from layerfold.models.devices import device_name

    device = resolve_device("auto")
    slug = args.device_slug or device_slug(device_name(device))
    entries = run_suite(chosen, args.out_dir, slug, timeout_s=args.timeout)
    records, skipped = split_entries(entries)
    collected = {"suite": args.suite, "environment": environment(device), "benchmarks": entries}
    write_json(args.out_dir / f"latest_{slug}.json", collected)
    with atomic_file(args.out_dir / f"latest_{slug}.md") as handle:
        handle.write(markdown(records, skipped, title=f"Benchmarks ({args.suite} suite)", environment=collected["environment"]))
    print(f"[run] wrote {args.out_dir / f'latest_{slug}.json'} and .md: {len(records)} with rows, {len(skipped)} not in the table")
    # a script not written yet, or one with an older layout, is noted; one that broke fails the run
    return 1 if any(e["status"] in ("failed", "timeout", "no_record") for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
