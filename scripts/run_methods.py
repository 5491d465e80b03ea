"""Run the pipeline stages in one process for several methods, without DVC (GPU boxes, sweeps).

Each method gets params.yaml composed from conf/ (the same composition as `dvc exp run`), then the
stage entry points run in DVC's order; base/data/capture/dense evaluation run once and are shared.
Per-method metrics, plans and the capture statistics are copied to ``--out/<method>/``.

    python scripts/run_methods.py --out results/run -o eval=gpu -m shortgpt laco mka gromov sleb drop_last
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the pipeline/ package beside scripts/

import yaml

from layerfold.config import compose
from layerfold.io import atomic_file
from layerfold.stage import BASE, CAPTURE, COMPRESSED, METRICS


def write_params(overrides: list[str]) -> None:
    with atomic_file("params.yaml") as handle:
        yaml.safe_dump(compose("conf", overrides), handle, sort_keys=False)


def timed(label: str, fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    seconds = time.perf_counter() - start
    print(f"== {label}: {seconds:.1f}s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("-o", "--override", action="append", default=[], help="Hydra override for every run")
    parser.add_argument("-m", "--methods", nargs="*", default=[], help="method group entries or +experiment=<preset>, each optionally followed by @key=value overrides")
    parser.add_argument("--skip-shared", action="store_true", help="reuse base/data/capture from a previous call")
    parser.add_argument("--no-dense", action="store_true", help="do not evaluate the dense model")
    args = parser.parse_args()

    from pipeline import base, capture, compress, data, evaluate

    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    write_params(args.override)
    if not args.skip_shared:
        timings["base"] = timed("base", base.main)
        timings["data"] = timed("data", data.main)
        timings["capture"] = timed("capture", capture.main)
    if not args.no_dense:
        timings["evaluate@dense"] = timed("evaluate@dense", evaluate.main, "dense", str(BASE))
        (args.out / "dense").mkdir(exist_ok=True)
        shutil.copy(METRICS / "dense.json", args.out / "dense" / "metrics.json")
        shutil.copy(CAPTURE / "stats.json", args.out / "dense" / "capture_stats.json")
        shutil.copy("params.yaml", args.out / "dense" / "params.yaml")
        (args.out / "timings.json").write_text(json.dumps(timings, indent=2))

    for method in args.methods:
        # "laco@method.threshold=0.5@method.merge_layers=2": a method with its own extra overrides
        method, *extra = method.split("@")
        selector = method if method.startswith("+") else f"method={method}"
        name = "_".join([method.split("=")[-1], *(e.split(".")[-1].replace("=", "") for e in extra)])
        write_params([*args.override, selector, *extra])
        timings[f"compress@{name}"] = timed(f"compress {name}", compress.main)
        timings[f"evaluate@{name}"] = timed(f"evaluate {name}", evaluate.main, "compressed", str(COMPRESSED))
        dest = args.out / name
        dest.mkdir(exist_ok=True)
        shutil.copy(METRICS / "compressed.json", dest / "metrics.json")
        shutil.copy(METRICS / "compress.json", dest / "compress.json")
        shutil.copy(COMPRESSED / "plan.json", dest / "plan.json")
        shutil.copy("params.yaml", dest / "params.yaml")
        (args.out / "timings.json").write_text(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
