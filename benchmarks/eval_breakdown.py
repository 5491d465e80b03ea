"""Where lm-eval's time goes, per task: task loading, building contexts, tokenizing, the model's
forward, scoring the logits, and post-processing (filters, metrics, aggregation).

    python benchmarks/eval_breakdown.py --model artifacts/base --mode both --out benchmarks/results/eval_breakdown_h100.json
    python benchmarks/eval_breakdown.py --tiny /path/to/tokenizer --limit 50 --out benchmarks/results/eval_breakdown_cpu_tiny.json

``--mode before`` runs each task through ``lm_eval.simple_evaluate`` the way layerfold used to (a
fresh task set per call, no caches); ``--mode after`` runs the whole suite through
:class:`layerfold.evaluation.runner.LmEvalRunner` twice on the same model ("first model": cold caches
in a fresh cache directory, "further model": warm), which is what every model after the first one
pays. ``--tiny`` swaps the model for a 2-layer random Llama with the given tokenizer's vocabulary, so
the forward is negligible and the overheads around it stand out (CPU).

The phases are measured by wrapping lm-eval's own methods with timers (CUDA synchronised around the
forward), so the numbers add up to the wall time without a profiler's overhead; "other" is the rest
of the wall time (mostly metric computation, aggregation and bootstrap stderrs).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from common import command_line  # noqa: E402

from layerfold.evaluation import runner as lm_eval_runner  # noqa: E402
from layerfold.evaluation import task_configs  # noqa: E402

SUITE = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq_notitle", "openbookqa", "mmlu"]


class PhaseTimer:
    """Accumulates seconds per phase by wrapping methods; nested phases are not double counted."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.device = device
        self._patches: list[tuple[object, str, object]] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, owner: object, attr: str, phase: str, exclusive_of: tuple[str, ...] = ()) -> None:
        original = getattr(owner, attr)
        timer = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            inner_before = sum(timer.seconds[p] for p in exclusive_of)
            timer._sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer._sync()
                inner = sum(timer.seconds[p] for p in exclusive_of) - inner_before
                timer.seconds[phase] += time.perf_counter() - start - inner

        self._patches.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._patches):
            setattr(owner, attr, original)
        self._patches.clear()

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


@contextlib.contextmanager
def instrumented(device: torch.device):
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.task import Task
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    timer = PhaseTimer(device)
    timer.wrap(TaskManager, "load", "load_tasks")
    timer.wrap(Task, "build_all_requests", "build_contexts")
    timer.wrap(TemplateLM, "_encode_pair", "tokenize")
    # loglikelihood = tokenizing the requests, then _loglikelihood_tokens (forward + scoring)
    lm_phases = ("tokenize", "score_logits", "forward")
    timer.wrap(TemplateLM, "loglikelihood", "tokenize", exclusive_of=lm_phases)
    timer.wrap(HFLM, "_model_call", "forward")
    # the vectorised scorer's own model call (head_rows=read); with head_rows=all it calls _model_call,
    # so the forward is counted once either way
    from layerfold.evaluation import lm as layerfold_lm

    timer.wrap(layerfold_lm, "_logits_at", "forward", exclusive_of=("forward",))
    timer.wrap(HFLM, "_loglikelihood_tokens", "score_logits", exclusive_of=("forward",))
    make_lm = lm_eval_runner.make_lm

    def timed_make_lm(*args, **kwargs):  # the runner's HFLM subclass tokenizes and scores in its own methods
        lm = make_lm(*args, **kwargs)
        timer.wrap(lm, "loglikelihood", "tokenize", exclusive_of=lm_phases)
        # with scoring=lm_eval this calls HFLM's (already timed) loop: count each second once
        timer.wrap(lm, "_loglikelihood_tokens", "score_logits", exclusive_of=("forward", "score_logits"))
        return lm

    lm_eval_runner.make_lm = timed_make_lm
    try:
        yield timer
    finally:
        timer.restore()
        lm_eval_runner.make_lm = make_lm


def tiny_model(tokenizer_dir: str, device: torch.device):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(device).eval(), tokenizer


def phases_row(seconds: dict[str, float], wall: float) -> dict[str, float]:
    row = {k: round(v, 3) for k, v in sorted(seconds.items())}
    row["other"] = round(wall - sum(seconds.values()), 3)
    row["wall"] = round(wall, 3)
    return row


def run_before(model, tokenizer, tasks, shots, args, task_dir) -> dict:
    """Each task through the pre-cache path: simple_evaluate with a fresh TaskManager per call."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    out = {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    with instrumented(model.device) as timer:
        for task in tasks:
            names, manager = task_configs.lm_eval_tasks([task], task_dir)
            start = time.perf_counter()
            results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots.get(task, 0), limit=args.limit,
                                              task_manager=manager, bootstrap_iters=args.bootstrap_iters, log_samples=False)
            wall = time.perf_counter() - start
            out[task] = phases_row(timer.take(), wall) | {"acc": results["results"][names[0]].get("acc,none")}
            print(task, out[task], flush=True)
    return out


def run_after(model, tokenizer, tasks, shots, args, task_dir, cache_dir: Path) -> dict:
    """The suite through LmEvalRunner: a cold first model, then the same model again with warm caches."""
    out = {}
    with instrumented(model.device) as timer:
        for label in ("first_model", "further_model_same_process", "further_model_new_runner")[:args.passes]:
            if label != "further_model_same_process":  # a new runner = what a later process sees
                runner = lm_eval_runner.LmEvalRunner(tasks, shots, task_dir, limit=args.limit, seed=0,
                                              bootstrap_iters=args.bootstrap_iters, cache_dir=cache_dir, scoring=args.scoring,
                                              head_rows=args.head_rows, batch_tokens=args.batch_tokens)
            per_task: dict[str, dict] = {}
            start = time.perf_counter()
            report = runner.evaluate(model, tokenizer, batch_size=args.batch_size, timings=per_task, phase_timer=timer)
            wall = time.perf_counter() - start
            scores = {t: {k: v for k, v in r.items() if k in ("acc", "acc_norm", "n")} for t, r in report.items()}
            out[label] = {"wall": round(wall, 3), "tasks": per_task, "acc": {t: r.get("acc") for t, r in report.items()}, "scores": scores}
            print(label, json.dumps(out[label]), flush=True)
    return out


SCORERS = {  # label -> (scoring, head_rows, batched by tokens); lm_eval first: the reference the others are compared to
    "lm_eval": ("lm_eval", "all", False),
    "vectorised": ("vectorised", "all", False),
    "vectorised_head_read": ("vectorised", "read", False),
    "vectorised_head_read_tokens": ("vectorised", "read", True),
}


def run_check(model, tokenizer, tasks, shots, args, task_dir, cache_dir: Path) -> dict:
    """Score the suite with lm-eval's own per-request loop, then with each vectorised scorer, keeping
    every request's answer; the check is that all ~10^5 (log-likelihood, is-greedy) pairs and every
    document's 0/1 are identical to lm-eval's. Pass a warm ``--cache-dir`` so every wall is a
    further-model time; the scorers run in ``SCORERS`` order (with ``--check-rounds 2`` again in
    reverse, each wall the lower of its two runs, so none gains from running later)."""
    answers: dict[str, list] = {}
    out: dict[str, dict] = {}
    walls: dict[str, list[float]] = defaultdict(list)
    make_lm = lm_eval_runner.make_lm
    labels = [label for label in SCORERS if label in args.scorers]
    for label in labels + (labels[::-1] if args.check_rounds == 2 else []):
        scoring, head_rows, by_tokens = SCORERS[label]
        recorded: list = []

        def recording_make_lm(*a, **k):
            lm = make_lm(*a, **k)
            score = lm._loglikelihood_tokens

            def keep(requests, disable_tqdm=False, override_bs=None):
                result = score(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
                recorded.extend(result)
                return result

            lm._loglikelihood_tokens = keep
            return lm

        lm_eval_runner.make_lm = recording_make_lm
        try:
            runner = lm_eval_runner.LmEvalRunner(tasks, shots, task_dir, limit=args.limit, seed=0, bootstrap_iters=args.bootstrap_iters,
                                          cache_dir=cache_dir, scoring=scoring, head_rows=head_rows,
                                          batch_tokens=args.batch_tokens if by_tokens else None)
            start = time.perf_counter()
            report = runner.evaluate(model, tokenizer, batch_size=args.batch_size)
            walls[label].append(round(time.perf_counter() - start, 3))
        finally:
            lm_eval_runner.make_lm = make_lm
        if label in answers:
            if answers[label] != recorded:
                raise RuntimeError(f"{label}: two runs of the same scorer disagree; the check is meaningless")
            continue
        answers[label] = recorded
        out[label] = {"requests": len(recorded),
                      "per_doc": {t: r.get("per_doc") for t, r in report.items()},
                      "scores": {t: {k: v for k, v in r.items() if k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n")}
                                 for t, r in report.items()}}
        print(label, walls[label], len(recorded), flush=True)
    stock = answers["lm_eval"]
    result: dict = {"requests": len(stock), "scorers": {}, "scores": out["lm_eval"]["scores"]}
    for label in labels:
        fast = answers[label]
        differing = [i for i, (a, b) in enumerate(zip(stock, fast)) if a != b]
        largest = max((abs(stock[i][0] - fast[i][0]) for i in differing), default=0.0)
        result["scorers"][label] = {
            "walls": walls[label], "wall": min(walls[label]), "requests": len(fast),
            "identical_requests": len(stock) == len(fast) and not differing,
            "differing_requests": len(differing),
            "differing_greedy": sum(stock[i][1] != fast[i][1] for i in differing),
            "largest_loglikelihood_difference": largest,
            "identical_per_doc": out[label]["per_doc"] == out["lm_eval"]["per_doc"],
            "identical_scores": out[label]["scores"] == out["lm_eval"]["scores"],
        }
    print(json.dumps(result["scorers"]), flush=True)
    return result


def run_overhead_only(model, tokenizer, tasks, shots, args, task_dir) -> dict:
    """The host-side work alone, no forward: building every request (templates recompiled per render,
    as lm-eval does, then compiled once) and tokenizing them (HFLM's two encodes per request, then
    the runner's batched, deduplicated tokenization)."""
    import lm_eval.utils
    from lm_eval.models.huggingface import HFLM

    out: dict[str, dict] = {}
    names, manager = task_configs.lm_eval_tasks(tasks, task_dir)
    loaded = {}
    for shots_n in sorted({shots.get(t, 0) for t in tasks}):
        group = [n for t, n in zip(tasks, names) if shots.get(t, 0) == shots_n]
        start = time.perf_counter()
        loaded[shots_n] = manager.load(group)
        out.setdefault("load_tasks", {})[f"{shots_n}-shot"] = round(time.perf_counter() - start, 3)

    def build(label: str) -> list:
        requests, start = [], time.perf_counter()
        for shots_n, task_dict in loaded.items():
            for task in task_dict["tasks"].values():
                if task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=shots_n)
                task.set_fewshot_seed(seed=0)
                task.build_all_requests(limit=args.limit)
                requests += task.instances
        out[label] = {"seconds": round(time.perf_counter() - start, 3), "requests": len(requests)}
        return requests

    assert not getattr(lm_eval.utils.env, "_layerfold_cached", False), "run --mode overhead in a fresh process"
    requests = build("build_contexts_stock")
    lm_eval_runner.compile_templates_once()
    build("build_contexts_templates_compiled_once")

    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    start = time.perf_counter()
    reference = [plain._encode_pair(*r.args) for r in requests if r.args[0]]
    out["tokenize_stock"] = {"seconds": round(time.perf_counter() - start, 3)}
    cache: dict = {}
    cached = lm_eval_runner.make_lm(model, tokenizer, 1, None, cache)
    cached._loglikelihood_tokens = lambda reqs, disable_tqdm=False: [r[1:] for r in reqs]  # no forward
    start = time.perf_counter()
    pairs = cached.loglikelihood(requests, disable_tqdm=True)
    out["tokenize_batched_once"] = {"seconds": round(time.perf_counter() - start, 3)}
    out["tokens_identical"] = [tuple(map(list, p)) for p, r in zip(pairs, requests) if r.args[0]] == [tuple(map(list, p)) for p in reference]
    start = time.perf_counter()
    cached.loglikelihood(requests, disable_tqdm=True)
    out["tokenize_further_model"] = {"seconds": round(time.perf_counter() - start, 3)}
    print(json.dumps(out, indent=2), flush=True)
    return out


def run_new_process(args) -> dict:
    """The first model of a *later* process, with lm-eval's request cache already on disk: each
    measurement is a fresh ``--mode after --passes 1`` child process on one persistent cache
    directory. "before" deletes the token cache files first (what the harness had before it wrote
    them: requests from disk, every string tokenized again); "after" keeps them."""
    import subprocess

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        base = [sys.executable, __file__, "--tiny" if args.tiny else "--model", args.tiny or args.model,
                "--benchmarks", args.benchmarks, "--tasks", *args.tasks, "--mmlu-shots", str(args.mmlu_shots),
                "--batch-size", str(args.batch_size), "--bootstrap-iters", str(args.bootstrap_iters),
                "--device", args.device, "--dtype", args.dtype, "--mode", "after", "--passes", "1", "--cache-dir", str(cache)]
        if args.no_forward:
            base.append("--no-forward")
        for label in ("populate_caches", "before_token_cache_removed", "after_token_cache_on_disk"):
            if label == "before_token_cache_removed":
                for path in cache.rglob("tokens-*.npz"):
                    path.unlink()
            child = Path(tmp) / f"{label}.json"
            start = time.perf_counter()
            subprocess.run([*base, "--out", str(child)], check=True)
            run = json.loads(child.read_text())["after"]["first_model"]
            out[label] = {"process_wall": round(time.perf_counter() - start, 3), "evaluate_wall": run["wall"],
                          "tasks": run["tasks"], "scores": run["scores"]}
            print(label, json.dumps(out[label]), flush=True)
    out["identical_scores"] = out["before_token_cache_removed"]["scores"] == out["after_token_cache_on_disk"]["scores"] == out["populate_caches"]["scores"]
    return out


def compare_with_reference(scores: dict[str, dict], paths: list[Path]) -> dict:
    """Every acc/acc_norm/n of ``scores`` against earlier ``metrics/<name>.json`` files (``lm_eval`` block)."""
    reference: dict[str, dict] = {}
    for path in paths:
        reference |= json.loads(path.read_text()).get("lm_eval", {})
    rows = {}
    for task, mine in scores.items():
        ref = reference.get(task)
        if ref is None:
            continue
        rows[task] = {k: {"now": mine.get(k), "reference": ref.get(k), "equal": mine.get(k) == ref.get(k)}
                      for k in ("acc", "acc_norm", "n") if k in ref}
    return {"files": [str(p) for p in paths], "tasks": rows,
            "all_equal": bool(rows) and all(c["equal"] for r in rows.values() for c in r.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory (e.g. artifacts/base)")
    source.add_argument("--tiny", metavar="TOKENIZER_DIR", help="random 2-layer Llama with this tokenizer")
    parser.add_argument("--benchmarks", default=str(REPO / "data/prepared/eval/benchmarks"), help="prepared benchmark dir (data stage)")
    parser.add_argument("--tasks", nargs="*", default=SUITE)
    parser.add_argument("--mmlu-shots", type=int, default=5)
    parser.add_argument("--limit", type=float, default=None, help="docs per task (per MMLU subject); default: full sets")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--bootstrap-iters", type=int, default=1000)
    parser.add_argument("--mode", choices=["before", "after", "both", "overhead", "newprocess", "check"], default="both",
                        help="overhead: request building and tokenization alone, stock vs cached, no forward; "
                             "check: lm-eval's scoring loop vs the vectorised scorer, every request compared; "
                             "newprocess: the first model of a later process (child processes on one persistent cache)")
    parser.add_argument("--scoring", choices=["vectorised", "lm_eval"], default="vectorised", help="after: the runner's scorer")
    parser.add_argument("--head-rows", choices=["all", "read"], default="all", help="after: where the vectorised scorer applies the LM head")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="after: padded tokens per forward (vectorised); check: the budget of vectorised_head_read_tokens")
    parser.add_argument("--check-rounds", type=int, choices=[1, 2], default=1, help="check: 2 = again in reverse order")
    parser.add_argument("--scorers", nargs="+", choices=list(SCORERS), default=list(SCORERS),
                        help="check: the scorers compared (lm_eval is always included, as the reference)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="after: request/token cache root (default: a fresh temporary one)")
    parser.add_argument("--no-forward", action="store_true",
                        help="replace HFLM._loglikelihood_tokens (forward, scoring, Collator) by constant results: overhead only, scores meaningless")
    parser.add_argument("--passes", type=int, choices=[1, 2, 3], default=3,
                        help="after: 1 = first model, 2 = + a further model in the same process, 3 = + one in a new runner (a later process)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--reference", type=Path, nargs="*", default=[],
                        help="earlier metrics/<name>.json files whose lm_eval scores the new path must reproduce exactly")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    args.batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    args.scorers = ["lm_eval", *(label for label in args.scorers if label != "lm_eval")]
    lm_eval_runner.quiet_lm_eval(REPO / ".cache/lm_eval/logs" / f"{args.out.stem}.log")  # lm-eval's own log lines

    if args.no_forward:
        from lm_eval.models.huggingface import HFLM

        HFLM._loglikelihood_tokens = lambda self, requests, disable_tqdm=False, override_bs=None: [(0.0, False)] * len(requests)
        from layerfold.evaluation import lm as layerfold_lm

        layerfold_lm._vectorised_loglikelihood = lambda lm, collator, requests, *rest: [(0.0, False)] * len(requests)
    if args.mode == "newprocess":
        result = {"command": command_line(), "date": time.strftime("%Y-%m-%d"), "tasks": args.tasks,
                  "num_fewshot": {"mmlu": args.mmlu_shots}, "limit": None, "no_forward": args.no_forward,
                  "torch_threads": torch.get_num_threads(), "newprocess": run_new_process(args)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    device = torch.device(args.device)
    if args.tiny:
        model, tokenizer = tiny_model(args.tiny, device)
    else:
        from layerfold.models import load_checkpoint

        model, tokenizer = load_checkpoint(args.model, device, args.dtype)
    model = model.to(getattr(torch, args.dtype))
    shots = {"mmlu": args.mmlu_shots}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": "tiny random llama (2 layers, hidden 64)" if args.tiny else args.model,
        "vocab": len(tokenizer), "dtype": args.dtype, "limit": args.limit, "batch_size": args.batch_size,
        "tasks": args.tasks, "num_fewshot": shots, "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(), "command": command_line(), "scoring": args.scoring,
        "head_rows": args.head_rows, "batch_tokens": args.batch_tokens,
    }
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = task_configs.write_task_configs(Path(args.benchmarks), Path(tmp) / "tasks")
        if args.mode == "overhead":
            result["overhead"] = run_overhead_only(model, tokenizer, args.tasks, shots, args, task_dir)
        if args.mode in ("before", "both"):
            result["before"] = run_before(model, tokenizer, args.tasks, shots, args, task_dir)
            result["before_total_s"] = round(sum(r["wall"] for r in result["before"].values()), 3)
        if args.mode in ("after", "both"):
            result["after"] = run_after(model, tokenizer, args.tasks, shots, args, task_dir, args.cache_dir or Path(tmp) / "cache")
        if args.mode == "check":
            result["check"] = run_check(model, tokenizer, args.tasks, shots, args, task_dir, args.cache_dir or Path(tmp) / "cache")
            if args.reference:
                result["reference_check"] = compare_with_reference(result["check"]["scores"], args.reference)
        if args.reference and "after" in result:
            result["reference_check"] = compare_with_reference(result["after"]["first_model"]["scores"], args.reference)
            print("identical to reference:", result["reference_check"]["all_equal"], flush=True)
        if args.mode == "both" and args.limit is None:  # with a limit, "before" reads the first docs, "after" a sample
            before = {t: r["acc"] for t, r in result["before"].items()}
            after = result["after"]["first_model"]["acc"]
            result["identical_acc"] = all(before[t] == after.get(t) for t in before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
