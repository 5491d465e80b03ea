"""Parity with the released code of ReplaceMe and LinearPatch, as ``python -m parity`` does for the seed methods
(research tooling: layerfold never imports this package).

    python -m parity.methods_2025 fetch --git-dir mts-ai/ReplaceMe=<git dir> --git-dir chenxinrui-tsinghua/LinearPatch=<git dir>
    python -m parity.methods_2025 run --checkpoint artifacts/base --blocks 32 --seq-len 128 --threads 1      # results/parity/
    python -m parity.methods_2025 run --methods linear_patch --checkpoint <stories260K HF dir> --num-remove 2 --tag stories260k

Both sides run on the same checkpoint, dtype, device and calibration blocks (the pipeline's policy), each in its
own process (its memory peaks are its own), and what they produced is compared tensor by tensor.

| method       | released code (pinned commit)                                          | layerfold side |
|--------------|------------------------------------------------------------------------|----------------|
| replaceme    | mts-ai/ReplaceMe ``distance.py`` profile_distances + ``lstsq.py`` lstsq | ``method=replaceme`` (``solver=inverse``) |
| replaceme (cosine) | the same, ``cosine_dist.py`` cosine_dist (Adam)                   | ``method.objective=cosine`` |
| linear_patch | chenxinrui-tsinghua/LinearPatch ``layer_select.py`` select_layer + ``block_scaling.py`` register_linear_patch | ``compensate=linear_patch`` (``estimate=mean_of_ratios``) on the released block |

**Adapting the released code, never editing it** (every adaptation is recorded in the result JSON):

- the model comes from the local checkpoint (``from_pretrained`` stand-ins return it; ReplaceMe's second load, in
  bfloat16, returns a bfloat16 copy of the same weights; LinearPatch gets the float16 model ``main_distill.py`` loads);
- calibration: the pipeline's token blocks through a tokenizer stand-in (ReplaceMe's ``get_calib_dataloader``
  returns them in batches; LinearPatch's loader yields one block per batch, as its ``batch_size=1``);
- hard-coded CUDA tensors and ``.to("cuda")`` go to the run device; ReplaceMe's output paths go to a temporary folder;
- two of ReplaceMe's imports that are not installed here and not on the compared path are stubbed (``termcolor.colored``
  prints plain text, ``torchmin.minimize`` raises if called: only its ``solver != adam`` path uses it).

Results: ``<out>/<method>[_<tag>].json`` (benchmark layout: environment, settings, rows with the timings, plus
``released``, ``adaptations``, ``comparisons``, ``passed``) and ``<out>/summary_2025.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.common import environment, write_result
from layerfold.io import atomic_file, read_json
from parity.adapters_2025 import RELEASED, Settings
from parity.compare import verdict
from parity.linear_patch import LINEAR_PATCH_ADAPTATIONS, compare_linear_patch, layerfold_linear_patch, released_linear_patch
from parity.orchestrate import SideFailed, _parse_git_dirs, add_worker_command, parameter_mib, run_in_worker, timing_rows, work
from parity.registry import Parity
from parity.released import DEFAULT_RELEASED_DIR, REPO, fetch_released, released_provenance
from parity.replaceme import REPLACEME_ADAPTATIONS, compare_replaceme, layerfold_replaceme, released_replaceme
from parity.runner import Outcome, calibration_blocks


PARITY = {
    "replaceme": Parity({"released": released_replaceme, "layerfold": layerfold_replaceme},
                        {"released": "released distance.py + lstsq.py", "layerfold": "layerfold replaceme (lstsq, solver=inverse)"},
                        compare_replaceme, REPLACEME_ADAPTATIONS),
    "replaceme_cosine": Parity({"released": lambda s, b: released_replaceme(s, b, "cosine"), "layerfold": lambda s, b: layerfold_replaceme(s, b, "cosine")},
                               {"released": "released distance.py + cosine_dist.py (Adam)", "layerfold": "layerfold replaceme (cosine)"},
                               lambda out, tol: compare_replaceme(out, tol, "cosine"), REPLACEME_ADAPTATIONS),
    "linear_patch": Parity({"released": released_linear_patch, "layerfold": layerfold_linear_patch},
                           {"released": "released select_layer + register_linear_patch", "layerfold": "layerfold compensate=linear_patch"},
                           compare_linear_patch, LINEAR_PATCH_ADAPTATIONS),
}
REPOSITORY = {"replaceme": "replaceme", "replaceme_cosine": "replaceme", "linear_patch": "linear_patch"}


def parity_record(method: str, settings: Settings, outcomes: dict[str, Outcome], measurements: dict[str, list[dict]], tolerance: float,
                  weights_mib: float, error: SideFailed | None = None) -> dict:
    spec = RELEASED[REPOSITORY[method]]
    provenance = released_provenance(Path(settings.released_dir), REPOSITORY[method]) or {}
    comparisons = [] if error else PARITY[method].compare(outcomes, tolerance)
    record = {
        "benchmark": f"parity_2025/{method}", "environment": environment(settings.device),
        "settings": {k: v for k, v in asdict(settings).items() if k != "released_dir"} | {"checkpoint": Path(settings.checkpoint).name,
                                                                                         "tolerance": tolerance},
        "released": {"repo": spec.repo, "commit": spec.commit, "files": list(spec.paths), "obtained_from": provenance.get("obtained_from")},
        "adaptations": list(PARITY[method].adaptations),
        "passed": False if error else verdict(comparisons), "comparisons": comparisons,
        "records": {side: o.record for side, o in outcomes.items()},
        "rows": timing_rows(PARITY[method].timed, measurements, settings.device, weights_mib),
        "notes": "Each side ran in its own process on the same checkpoint and calibration blocks; seconds cover the method only "
                 "(model loading excluded) after one untimed warm-up forward; peak_host_mib is the resident set size sampled every "
                 "10 ms during the method.",
    }
    if error:
        record["error"] = {"side": error.side, "traceback": error.traceback}
    return record


def run_parity(args: argparse.Namespace) -> None:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(checkpoint=str(Path(args.checkpoint).resolve()), device=device, dtype=args.dtype, num_remove=args.num_remove,
                        blocks=args.blocks, seq_len=args.seq_len, batch_size=args.batch_size,
                        released_dir=str(Path(args.released_dir).expanduser()), threads=args.threads)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    git_dirs = _parse_git_dirs(args.git_dir)
    for method in args.methods:
        repo = REPOSITORY[method]
        fetch_released(repo, Path(settings.released_dir), git_dirs.get(RELEASED[repo].repo))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.checkpoint)
    weights_mib = parameter_mib(Path(settings.checkpoint), getattr(torch, settings.dtype))
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            count = max(settings.blocks, 128) if method == "linear_patch" else settings.blocks
            blocks, _ = calibration_blocks(Settings(checkpoint=settings.checkpoint, blocks=count, seq_len=settings.seq_len,
                                                              data_dir=args.data_dir), tokenizer)
            blocks_file = Path(scratch) / f"{method}-blocks.pt"
            torch.save(blocks, blocks_file)
            outcomes, measurements, error = {}, {}, None
            try:
                for side in PARITY[method].sides:
                    if method == "linear_patch" and side == "layerfold":
                        settings.window = outcomes["released"].record["window"]
                        width = int(settings.extra["width"])
                        settings.released_rotation = (width & (width - 1)) != 0  # not a power of two: layerfold's block differs
                    settings_file = Path(scratch) / f"{method}-{side}.json"
                    settings_file.write_text(json.dumps(asdict(settings)), encoding="utf-8")
                    for r in range(args.repeats):
                        print(f"[parity] {method}/{side} run {r + 1}/{args.repeats}", flush=True)
                        outcome = run_in_worker(method, side, settings_file, blocks_file, Path(scratch) / method / f"{side}-{r}",
                                                module="parity.methods_2025")
                        measurements.setdefault(side, []).append(outcome.measurement)
                        outcomes[side] = outcome
                    if method == "linear_patch" and side == "released":
                        settings.extra["width"] = int(outcomes["released"].state["rotation"].shape[0])
            except SideFailed as err:
                error = err
            record = parity_record(method, settings, outcomes, measurements, args.tolerance, weights_mib, error)
            record["settings"]["blocks"] = count
            name = f"{method}_{args.tag}" if args.tag else method
            write_result(out / f"{name}.json", record)
            print(f"[parity] {name}: {'PASS' if record['passed'] else 'FAIL'}", flush=True)
            settings.window, settings.released_rotation = None, False
    write_summary(out)


def write_summary(out: Path) -> None:
    """``<out>/summary_2025.md`` from every methods_2025 parity JSON there (benchmark "parity_2025/...")."""
    lines = ["# Parity with the released code: ReplaceMe and LinearPatch", "",
             "Generated by `python -m parity.methods_2025`; one JSON per run beside this file, every comparison saying what it compared. "
             "Rows with gate `no` are documented differences and do not decide the verdict.", ""]
    for file in sorted(out.glob("*.json")):
        rec = read_json(file)
        if not str(rec.get("benchmark", "")).startswith("parity_2025/"):
            continue
        s, env = rec["settings"], rec["environment"]
        lines += [f"## {file.stem}: {'PASS' if rec['passed'] else 'FAIL'}", "",
                  f"{rec['released']['repo']} @ `{rec['released']['commit'][:12]}`; {s['checkpoint']}, {s['dtype']} on {env['device']}, "
                  f"{s['blocks']} x {s['seq_len']} calibration tokens, num_remove {s['num_remove']}.", ""]
        if "error" in rec:
            lines += [f"The {rec['error']['side']} side failed (traceback in {file.name}).", ""]
        lines += ["| comparison | gate | result | max abs diff | tolerance |", "|---|---|---|---|---|"]
        for c in rec["comparisons"]:
            diff, gate = c.get("max_abs_diff"), c.get("gate", True)
            result = "pass" if c["passed"] else ("FAIL" if gate else "differs (documented)")
            lines.append(f"| {c['name']} | {'yes' if gate else 'no'} | {result} | {'' if diff is None else f'{diff:.3g}'} | {c.get('tolerance', 'exact')} |")
        lines += ["", "| implementation | seconds | peak host RSS MiB |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['seconds']:.2f} | {r['peak_host_mib']:.0f} |" for r in rec["rows"]]
        lines.append("")
    with atomic_file(out / "summary_2025.md") as handle:
        handle.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m parity.methods_2025", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="copy the pinned released files into --released-dir")
    run = commands.add_parser("run", help="fetch if needed, run both sides, compare, write results")
    for p in (fetch, run):
        p.add_argument("--methods", nargs="+", choices=list(PARITY), default=list(PARITY))
        p.add_argument("--released-dir", default=str(DEFAULT_RELEASED_DIR))
        p.add_argument("--git-dir", action="append", default=[], metavar="OWNER/NAME=PATH")
    run.add_argument("--checkpoint", default="artifacts/base")
    run.add_argument("--device", default="auto")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--num-remove", type=int, default=8)
    run.add_argument("--blocks", type=int, default=32, help="calibration blocks (linear_patch reads at least 128)")
    run.add_argument("--seq-len", type=int, default=128)
    run.add_argument("--batch-size", type=int, default=4)
    run.add_argument("--data-dir", default=os.environ.get("LAYERFOLD_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--repeats", type=int, default=1)
    run.add_argument("--tolerance", type=float, default=1e-6, help="relative tolerance of the fitted map T (x max|T|)")
    run.add_argument("--tag", default="", help="suffix of the result files (e.g. the model)")
    run.add_argument("--out", default="results/parity")
    add_worker_command(commands, list(PARITY))
    args = parser.parse_args()
    if args.command == "fetch":
        git_dirs = _parse_git_dirs(args.git_dir)
        for method in args.methods:
            repo = REPOSITORY[method]
            record = fetch_released(repo, Path(args.released_dir), git_dirs.get(RELEASED[repo].repo))
            print(f"{method}: {record['repo']} @ {record['commit']}")
    elif args.command == "run":
        run_parity(args)
    else:
        work(args, Settings, lambda method, side, settings, blocks: PARITY[method].sides[side](settings, blocks))


if __name__ == "__main__":
    from layerfold.io import install_error_hook

    install_error_hook("parity.methods_2025")  # layerfold's errors as one line; --debug: the traceback
    main()
