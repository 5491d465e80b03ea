"""Run the pipeline stages in one process for several methods, without DVC (GPU boxes, sweeps).

Each entry gets params.yaml composed from conf/ (the same composition as `dvc exp run`), then the
stage entry points run in DVC's order: base/data/capture and the dense evaluation once, then per
entry compress, recover (when `recovery` is not `none`) and evaluate. Everything runs in one process,
so lm-eval's task set, prompt templates, request cache and tokenized requests are built once and
shared by every model. Per-entry metrics, plans and timings go to ``--out/<name>/``; per-model wall
times to ``--out/timings.json`` and the console.

Everything is written under ``--out``: the stages run with ``--out/workspace/`` as their working
directory (its ``params.yaml``, ``artifacts/``, ``data/prepared/``, ``metrics/`` and lm-eval's request
cache), so the DVC workspace's own ``params.yaml``, ``metrics/`` and ``artifacts/`` are never touched.
``--skip-shared`` reuses the base, data and capture of an earlier call with the same ``--out``.

    python scripts/run_methods.py --out results/run -o eval=gpu -m shortgpt laco mka gromov sleb drop_last
    python scripts/run_methods.py --out results/run -o eval=gpu -m streamline@method.replacement=ffn shortgpt@recovery=lora

An entry is a method name (or ``+experiment=<preset>``) followed by ``@key=value`` overrides; its
folder is named after the method and its overrides (``streamline_replacementffn``, ``shortgpt_recoverylora``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline/ package beside scripts/

import yaml
from omegaconf import OmegaConf

from layerfold.config import compose
from layerfold.io import atomic_file
from layerfold.stage import BASE, CAPTURE, COMPRESSED, METRICS, RECOVERED

# Settings that may name a file or folder: given relative, they are relative to where the script was started,
# not to the workspace the stages run in.
PATH_SETTINGS = ("model.path", "model.tokenizer", "data.local_dir", "tracking.dir")


def write_params(overrides: list[str], launched_from: Path) -> dict:
    """Compose ``params.yaml`` in the current directory (the workspace) as ``dvc exp run`` would, from the repository's ``conf/``."""
    params = compose(REPO / "conf", overrides)
    for key in PATH_SETTINGS:
        value = OmegaConf.select(OmegaConf.create(params), key)
        if isinstance(value, str) and value and not value.startswith(("$", "~", "/")):
            section, leaf = key.split(".")
            params[section][leaf] = str(launched_from / value)
    with atomic_file("params.yaml") as handle:
        yaml.safe_dump(params, handle, sort_keys=False)
    return params


def timed(label: str, fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    seconds = time.perf_counter() - start
    print(f"== {label}: {seconds:.1f}s", flush=True)
    return seconds


def parse_entry(entry: str) -> tuple[str, list[str], str]:
    """``"shortgpt@recovery=lora@method.num_remove=6"`` -> (``method=shortgpt``, overrides,
    ``shortgpt_recoverylora_num_remove6``): the folder names the last key part and value of each override."""
    method, *extra = entry.split("@")
    selector = method if method.startswith("+") else f"method={method}"
    def short(override: str) -> str:  # "recovery.end_to_end.kd_weight=1.0" -> "kd_weight1.0"
        key, _, value = override.partition("=")
        return (key.split(".")[-1] + value).replace("/", "-")

    name = "_".join([method.split("=")[-1], *(short(e) for e in extra)])
    return selector, extra, name


def copy_if(source: Path, dest: Path) -> None:
    if source.is_file():
        shutil.copy(source, dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("-o", "--override", action="append", default=[], help="Hydra override for every run")
    parser.add_argument("-m", "--methods", nargs="*", default=[], help="entries: a method or +experiment=<preset>, each optionally followed by @key=value overrides")
    parser.add_argument("--skip-shared", action="store_true", help="reuse base/data/capture from a previous call")
    parser.add_argument("--no-dense", action="store_true", help="do not evaluate the dense model")
    parser.add_argument("--final-only", action="store_true", help="with a recovery, score only the recovered model, not the compressed one")
    args = parser.parse_args()

    from pipeline import base, capture, compress, data, evaluate

    entries = [parse_entry(e) for e in args.methods]
    names = [name for _, _, name in entries]
    if len(set(names)) != len(names):
        sys.exit(f"two entries would write the same folder: {names}; add an override that tells them apart")
    launched_from = Path.cwd()
    args.out = args.out.resolve()
    workspace = args.out / "workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / ".gitignore").write_text("# checkpoints and intermediate data of scripts/run_methods.py: never committed\n*\n")
    os.chdir(workspace)  # every stage path (params.yaml, artifacts/, data/, metrics/) now lies under --out
    timings: dict[str, float] = {}
    per_model: dict[str, float] = {}

    def save() -> None:
        (args.out / "timings.json").write_text(json.dumps({"stages": timings, "evaluate_per_model": per_model}, indent=2) + "\n")

    # The shared stages validate the whole params.yaml, method included, against the model: compose them
    # with the first entry so a method setting that only fits this model (e.g. num_remove on a tiny
    # model) is not checked against the default method's.
    first = [entries[0][0], *entries[0][1]] if entries else []
    write_params([*args.override, *first], launched_from)
    if not args.skip_shared:
        timings["base"] = timed("base", base.main)
        timings["data"] = timed("data", data.main)
        timings["capture"] = timed("capture", capture.main)
    if not args.no_dense:
        per_model["dense"] = timings["evaluate@dense"] = timed("evaluate dense", evaluate.main, "dense", str(BASE))
        (args.out / "dense").mkdir(exist_ok=True)
        shutil.copy(METRICS / "dense.json", args.out / "dense" / "metrics.json")
        copy_if(METRICS / "documents" / "dense.json", args.out / "dense" / "documents.json")  # per-document results
        copy_if(CAPTURE / "stats.json", args.out / "dense" / "capture_stats.json")
        shutil.copy("params.yaml", args.out / "dense" / "params.yaml")
        save()

    for selector, extra, name in entries:
        params = write_params([*args.override, selector, *extra], launched_from)
        timings[f"compress@{name}"] = timed(f"compress {name}", compress.main)
        recovery = (params.get("recovery") or {}).get("name", "none")
        if recovery != "none":
            from pipeline import recover

            timings[f"recover@{name}"] = timed(f"recover {name} ({recovery})", recover.main)
            # the compressed model is scored too (unless --final-only), so compressed and recovered show side by side
            if not args.final_only:
                per_model[name] = timings[f"evaluate@{name}"] = timed(f"evaluate {name} (compressed)", evaluate.main, "compressed", str(COMPRESSED))
            per_model[f"{name} (recovered)"] = timings[f"evaluate@{name}:recovered"] = timed(
                f"evaluate {name} (recovered)", evaluate.main, "recovered", str(RECOVERED))
        else:
            per_model[name] = timings[f"evaluate@{name}"] = timed(f"evaluate {name}", evaluate.main, "compressed", str(COMPRESSED))
        dest = args.out / name
        dest.mkdir(exist_ok=True)
        if recovery == "none" or not args.final_only:
            shutil.copy(METRICS / "compressed.json", dest / "metrics.json")
            copy_if(METRICS / "documents" / "compressed.json", dest / "documents.json")
        for source, target in ((METRICS / "compress.json", "compress.json"), (METRICS / "compress_time.json", "compress_time.json"),
                               (COMPRESSED / "plan.json", "plan.json"), (Path("params.yaml"), "params.yaml")):
            copy_if(source, dest / target)
        if recovery != "none":
            copy_if(METRICS / "recovered.json", dest / "recovered.json")
            copy_if(METRICS / "documents" / "recovered.json", dest / "recovered_documents.json")
            copy_if(METRICS / "recover.json", dest / "recover.json")
            copy_if(METRICS / "recover_time.json", dest / "recover_time.json")
        save()

    print("== evaluation wall time per model: " + ", ".join(f"{k} {v:.1f}s" for k, v in per_model.items()), flush=True)


if __name__ == "__main__":
    from layerfold.io import install_error_hook

    install_error_hook("run_methods")  # layerfold's errors (a bad override, a missing file) as one line; --debug: the traceback
    main()
