"""Orchestration: one process per side and repeat, then compare and write the results and the summary."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Timing, environment, row, write_result
from layerfold.io import atomic_file, read_json
from parity.compare import verdict
from parity.registry import PARITY
from parity.released import METHODS, RELEASED, REPO, ReleasedCodeMissing, fetch_released, released_provenance
from parity.runner import Outcome, Settings, calibration_blocks


def run_side(method: str, side: str, settings: Settings, blocks: torch.Tensor) -> Outcome:
    """One side of one method in this process (the worker entry point, and what tests call)."""
    return PARITY[method].sides[side](settings, blocks)


class SideFailed(RuntimeError):
    """One side of a comparison exited with an error; carries the end of its traceback."""

    def __init__(self, method: str, side: str, stderr: str) -> None:
        lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
        self.method, self.side, self.traceback = method, side, "\n".join(lines[-25:])
        super().__init__(f"{method}/{side} failed:\n{self.traceback}")


def run_in_worker(method: str, side: str, settings_file: Path, blocks_file: Path, folder: Path, module: str = "parity") -> Outcome:
    """One side in a fresh process (``python -m <module> worker``), so its peak memory is its own; reads back what it wrote."""
    cmd = [sys.executable, "-m", module, "worker", "--method", method, "--side", side,
           "--settings", str(settings_file), "--blocks", str(blocks_file), "--out", str(folder)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SideFailed(method, side, done.stderr)
    from safetensors.torch import load_file

    state_file = folder / "state.safetensors"
    state = load_file(state_file) if state_file.exists() else {}
    payload = read_json(folder / "outcome.json")
    return Outcome(payload["record"], state, payload["measurement"])


def add_worker_command(commands: Any, methods: Sequence[str]) -> None:
    """The hidden ``worker`` subcommand that :func:`run_in_worker` starts (both parity entry points have it)."""
    worker = commands.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--method", choices=list(methods), required=True)
    worker.add_argument("--side", required=True)
    worker.add_argument("--settings", type=Path, required=True)
    worker.add_argument("--blocks", type=Path, required=True)
    worker.add_argument("--out", type=Path, required=True)


def work(args: argparse.Namespace, settings_type: type, run: Any) -> None:
    """The worker command: ``run(method, side, settings, blocks)`` on the files ``run_in_worker`` handed over, its
    outcome written back."""
    settings = settings_type(**json.loads(args.settings.read_text(encoding="utf-8")))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    write_outcome(run(args.method, args.side, settings, torch.load(args.blocks, weights_only=True)), args.out)


def write_outcome(outcome: Outcome, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if outcome.state:
        save_file({k: v.contiguous() for k, v in outcome.state.items()}, str(folder / "state.safetensors"))
    with atomic_file(folder / "outcome.json") as handle:
        json.dump({"record": outcome.record, "measurement": outcome.measurement}, handle, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def timing_rows(timed: dict[str, str], measurements: dict[str, list[dict]], device: str, weights_mib: float) -> list[dict]:
    """One benchmark row per timed side (``timed``: side -> row label): median seconds over the repeats and the worst
    peaks seen."""
    rows = []
    for side, label in timed.items():
        runs = measurements.get(side, [])
        if not runs:
            continue
        gpu = [m["peak_gpu_mib"] for m in runs if m.get("peak_gpu_mib") is not None]
        rows.append(row(
            label, timing=Timing([m["seconds"] for m in runs]), device="cpu",  # peaks below come from the worker
            side=side, device_measured=device, peak_gpu_mib=max(gpu) if gpu else None,
            peak_gpu_over_weights=round(max(gpu) / weights_mib, 3) if gpu and weights_mib else None,
            gpu_mib_before=runs[0].get("gpu_mib_before"), peak_host_mib=max(m["peak_host_rss_mib"] for m in runs),
            host_rss_before_mib=runs[0]["host_rss_before_mib"],
            host_rss_high_water_mib=max(m["host_rss_high_water_mib"] for m in runs),
        ))
    return rows


def parity_record(method: str, settings: Settings, outcomes: dict[str, Outcome], measurements: dict[str, list[dict]],
                  tolerance: float, weights_mib: float) -> dict:
    spec = RELEASED[method]
    comparisons = PARITY[method].compare(outcomes, tolerance)
    provenance = released_provenance(Path(settings.released_dir), method) or {}
    return {
        "benchmark": f"parity_released/{method}",
        "environment": environment(settings.device),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("released_dir", "data_dir")} | {
            "checkpoint": Path(settings.checkpoint).name, "weight_tolerance": tolerance, "repeats": len(next(iter(measurements.values()), []))},
        "released": {"repo": spec.repo, "commit": spec.commit, "files": list(spec.paths), "obtained_from": provenance.get("obtained_from")},
        "adaptations": list(PARITY[method].adaptations),
        "passed": verdict(comparisons),
        "comparisons": comparisons,
        "rows": timing_rows(PARITY[method].timed, measurements, settings.device, weights_mib),
        "notes": "Each side ran in its own process on the same checkpoint, dtype, device and calibration blocks; seconds cover "
                 "the method only (scoring included, model loading excluded) after one untimed warm-up forward; "
                 "peak_gpu_mib is torch.cuda.max_memory_allocated during the method (gpu_mib_before: allocated when it "
                 "started); peak_host_mib is the process's resident set size sampled every 10 ms during the method "
                 "(host_rss_before_mib: when it started; host_rss_high_water_mib: the kernel's high-water mark, model loading included).",
    }


def failure_record(method: str, settings: Settings, err: SideFailed, measurements: dict[str, list[dict]], weights_mib: float) -> dict:
    """The method's JSON when one side could not finish: no comparison, the error, what was measured."""
    spec = RELEASED[method]
    return {
        "benchmark": f"parity_released/{method}", "environment": environment(settings.device),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("released_dir", "data_dir")} | {"checkpoint": Path(settings.checkpoint).name},
        "released": {"repo": spec.repo, "commit": spec.commit, "files": list(spec.paths)},
        "adaptations": list(PARITY[method].adaptations), "passed": False, "comparisons": [],
        "error": {"side": err.side, "traceback": err.traceback},
        "rows": timing_rows(PARITY[method].timed, measurements, settings.device, weights_mib),
        "notes": f"The {err.side} side exited with an error, so nothing was compared; see error.traceback.",
    }


def summary_markdown(records: dict[str, dict]) -> str:
    lines = ["# Parity with the released code", "",
             "Generated by `python -m parity`; one JSON per method beside this file, where every comparison says "
             "what it compared (`what`). Rows with gate `no` are documented, deliberate differences and do not decide the "
             "verdict. Seconds: median over the repeats; peak host RSS sampled during the method.", ""]
    for method, rec in records.items():
        env, s = rec["environment"], rec["settings"]
        lines += [f"## {method}: {'PASS' if rec['passed'] else 'FAIL'}", ""]
        if "error" in rec:
            last = rec["error"]["traceback"].splitlines()[-1] if rec["error"]["traceback"] else ""
            lines += [f"The {rec['error']['side']} side failed: `{last}` (traceback in {method}.json).", ""]
        lines += [
                  f"{rec['released']['repo']} @ `{rec['released']['commit'][:12]}`; {s['checkpoint']}, {s['dtype']} on "
                  f"{env['device']}, {s['blocks']} x {s['seq_len']} calibration tokens"
                  + (" (LaCo reads its 5 sentences; its depth follows the threshold)" if method == "laco" else f", num_remove {s['num_remove']}")
                  + (f"; layerfold overrides {s['overrides'][method]}" if s.get("overrides", {}).get(method) else "") + ".", "",
                  "| comparison | gate | result | max abs diff | tolerance |", "|---|---|---|---|---|"]
        for c in rec["comparisons"]:
            diff, gate = c.get("max_abs_diff"), c.get("gate", True)
            result = "pass" if c["passed"] else ("FAIL" if gate else "differs (documented)")
            lines.append(f"| {c['name']} | {'yes' if gate else 'no'} | {result} | "
                         f"{'' if diff is None else f'{diff:.3g}'} | {c.get('tolerance', 'exact')} |")
        lines += ["", "| implementation | seconds | peak GPU MiB | peak host RSS MiB |", "|---|---|---|---|"]
        for r in rec["rows"]:
            lines.append(f"| {r['name']} | {r['seconds']:.2f} | {r['peak_gpu_mib'] if r['peak_gpu_mib'] is not None else '-'} | "
                         f"{r['peak_host_mib']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run_parity(args: argparse.Namespace) -> None:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(
        checkpoint=str(Path(args.checkpoint).resolve()), device=device, dtype=args.dtype, num_remove=args.num_remove,
        blocks=args.blocks, seq_len=args.seq_len, batch_size=args.batch_size, released_dir=str(Path(args.released_dir).expanduser()),
        data_dir=str(Path(os.path.expandvars(args.data_dir)).expanduser()), mka_memoise=args.mka_memoise,
        threads=args.threads, overrides=_parse_overrides(args.override),
    )
    if settings.threads:
        torch.set_num_threads(settings.threads)  # recorded by environment() in the device name
    try:
        for method in args.methods:
            fetch_released(method, Path(settings.released_dir), _parse_git_dirs(args.git_dir).get(RELEASED[method].repo))
    except ReleasedCodeMissing as err:
        raise SystemExit(str(err)) from None
    from transformers import AutoTokenizer

    if not (Path(settings.checkpoint) / "config.json").is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no config.json there; give an HF checkpoint directory "
                         "(the pipeline's artifacts/base is built by `dvc repro base`).")
    tokenizer = AutoTokenizer.from_pretrained(settings.checkpoint)
    blocks, _ = calibration_blocks(settings, tokenizer)
    weights_mib = parameter_mib(Path(settings.checkpoint), getattr(torch, settings.dtype))
    out = Path(args.out)
    records = {}
    with tempfile.TemporaryDirectory() as scratch:
        settings_file, blocks_file = Path(scratch) / "settings.json", Path(scratch) / "blocks.pt"
        settings_file.write_text(json.dumps(asdict(settings)), encoding="utf-8")
        torch.save(blocks, blocks_file)
        for method in args.methods:
            outcomes, measurements = {}, {}
            try:
                for side in PARITY[method].sides:
                    repeats = args.repeats if side in PARITY[method].timed else 1
                    for r in range(repeats):
                        folder = Path(scratch) / method / f"{side}-{r}"
                        print(f"[parity] {method}/{side} run {r + 1}/{repeats}", flush=True)
                        outcome = run_in_worker(method, side, settings_file, blocks_file, folder)
                        measurements.setdefault(side, []).append(outcome.measurement)
                        outcomes[side] = outcome
                        shutil.rmtree(folder)
            except SideFailed as err:  # a side that crashes is a result too (e.g. a bug in the released code)
                records[method] = failure_record(method, settings, err, measurements, weights_mib)
            else:
                records[method] = parity_record(method, settings, outcomes, measurements, args.tolerance, weights_mib)
            write_result(out / f"{method}.json", records[method])
            del outcomes
    write_summary(out)


def write_summary(out: Path) -> None:
    """``<out>/summary.md`` from every ``<out>/<method>.json`` present."""
    with atomic_file(out / "summary.md") as handle:
        handle.write(summary_markdown({m: read_json(out / f"{m}.json") for m in METHODS if (out / f"{m}.json").exists()}))


def parameter_mib(checkpoint: Path, dtype: torch.dtype) -> float:
    """Size of the checkpoint's tensors in ``dtype`` (the denominator of peak GPU memory over weights)."""
    from safetensors import safe_open

    numel = 0
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            numel += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return numel * torch.empty((), dtype=dtype).element_size() / 2**20


def _parse_overrides(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or method not in METHODS or "=" not in override:
            raise SystemExit(f"--override '{item}': expected METHOD:KEY=VALUE with METHOD one of {list(METHODS)}, "
                             "e.g. laco:method.add_bos=false.")
        out.setdefault(method, []).append(override)
    return out


def _parse_git_dirs(items: Sequence[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        repo, sep, path = item.partition("=")
        known = [spec.repo for spec in RELEASED.values()]
        if not sep or repo not in known:
            raise SystemExit(f"--git-dir '{item}': expected OWNER/NAME=PATH with OWNER/NAME one of {known}.")
        out[repo] = Path(path).expanduser()
    return out
