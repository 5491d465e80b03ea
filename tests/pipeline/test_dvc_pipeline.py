"""The whole DVC pipeline on stories260K in a fresh clone: `dvc exp run` with Hydra overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import data_dir, make_clone, models_dir

TINY = [
    "model=stories260k",
    "data.calibration.num_blocks=8",
    "data.calibration.seq_len=64",
    "data.benchmarks=[arc_easy]",
    "method.num_remove=2",
    "eval.perplexity.seq_len=128",
    "eval.perplexity.max_windows=2",
    "eval.lm_eval.tasks=[arc_easy]",
    "eval.lm_eval.limit=4",
    "eval.lm_eval.batch_size=4",
    "eval.efficiency.prompt_len=16",
    "eval.efficiency.new_tokens=4",
    "eval.efficiency.repeats=1",
]


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    if not (data_dir().is_dir() and (models_dir() / "stories260K").is_dir()):
        pytest.skip("local datasets/models folders not present")
    return make_clone(tmp_path_factory.mktemp("clone") / "repo")


def test_exp_run_end_to_end(clone):
    repo, env = clone
    run(["dvc", "exp", "run", "-n", "tiny", *[a for o in TINY for a in ("-S", o)]], repo, env)

    plan = json.loads((repo / "artifacts/compressed/plan.json").read_text())
    assert plan["original_layers"] == 5 and len(plan["layers"]) == 3
    assert len(plan["removed"]) == 2
    config = json.loads((repo / "artifacts/compressed/config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert load_file(repo / "data/prepared/calibration/blocks.safetensors")["input_ids"].shape == (8, 64)

    # recovery=none (the default): the recover stage writes the compressed model itself (a checkpoint that loads
    # with from_pretrained, with its card) and a pointer naming the checkpoint it is the same model as
    recovered = {p.name for p in (repo / "artifacts/recovered").iterdir()}
    assert {"config.json", "model.safetensors", "plan.json", "pointer.json", "README.md"} <= recovered
    # ...and evaluate@recovered records that it is the compressed model instead of scoring it twice
    assert json.loads((repo / "metrics/recovered.json").read_text()) == {"same_model_as": "artifacts/compressed"}
    for name in ("dense", "compressed"):
        metrics = json.loads((repo / f"metrics/{name}.json").read_text())
        assert metrics["perplexity"]["wikitext2"]["windows"] == 2
        assert 1 < metrics["perplexity"]["wikitext2"]["perplexity"] < 1e4
        assert 0 <= metrics["lm_eval"]["arc_easy"]["acc"] <= 1 and "acc_norm" in metrics["lm_eval"]["arc_easy"]
        assert "per_doc" not in metrics["lm_eval"]["arc_easy"] and "wall_time" not in metrics  # numbers only
        documents = json.loads((repo / f"metrics/documents/{name}.json").read_text())["lm_eval"]["arc_easy"]
        assert documents["per_doc"]["acc"] and documents["answers"]["floor"]["chance"] > 0
        # timings and the machine: git-ignored, under the main workspace, one folder per experiment
        machine = json.loads((repo / f"metrics/timings/tiny/evaluate-{name}.json").read_text())
        assert machine["efficiency"]["decode_tokens_per_s"] > 0 and machine["device"]
    assert (repo / "reports/report.md").exists()
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert summary["layers"] == 3 and summary["rule"] == "auto" and "headline" in summary

    shown = run(["dvc", "exp", "show", "--json"], repo, env)
    assert "tiny" in shown


def test_eval_knob_does_not_rerun_capture_or_compress(clone):
    repo, env = clone
    out = run(["dvc", "exp", "run", "-n", "tiny-eval", *[a for o in TINY for a in ("-S", o)], "-S", "eval.perplexity.max_windows=1"], repo, env)
    assert "Running stage 'capture'" not in out and "Running stage 'compress'" not in out
    assert "Running stage 'recover'" not in out
    assert "Running stage 'evaluate@dense'" in out
    metrics = json.loads((repo / "metrics/dense.json").read_text())
    assert metrics["perplexity"]["wikitext2"]["windows"] == 1


def test_run_methods_without_dvc(clone):
    """The GPU-box runner: same stages, composed params, one process, per-method result folders."""
    repo, env = clone
    overrides = [a for o in TINY if not o.startswith("method.") for a in ("-o", o)]
    run([sys.executable, "scripts/run_methods.py", "--out", "results/tiny", *overrides, "-m", "drop_last@method.num_remove=1", "gromov@method.num_remove=2"], repo, env)
    plan = json.loads((repo / "results/tiny/drop_last_num_remove1/plan.json").read_text())
    assert plan["removed"] == [4]
    assert json.loads((repo / "results/tiny/gromov_num_remove2/metrics.json").read_text())["model"]["num_layers"] == 3
    table = run([sys.executable, "scripts/runs.py", "table", "results/tiny"], repo, env)
    assert any(line.startswith("| dense | 5 |") for line in table.splitlines())
    assert table.startswith("**Headline** = mean over the informative tasks")
