"""What a researcher sees from a run on stories260K: short log sentences at INFO, a plan in one line, model cards
on every checkpoint, a recovered folder that loads with ``from_pretrained``, errors as one line (tracebacks behind
``LAYERFOLD_DEBUG``/``--debug``), wandb runs inside the project, and plots that need no network."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from conftest import REPO, data_dir, models_dir
from layerfold.config import compose
from layerfold.models.card import CARD_FILE, model_card
from layerfold.stage import COMPRESSED, RECOVERED
from layerfold.surgery.plan import LayerPlan, describe_plan

TINY = [
    "model=stories260k", "data.calibration.num_blocks=4", "data.calibration.seq_len=64", "data.benchmarks=[]",
    "eval.lm_eval.tasks=[]", "method.num_remove=2", "eval.perplexity.seq_len=128", "eval.perplexity.max_windows=2",
]
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \[[^\]]+\] ")  # stage.start's log format


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _info_lines(capfd_text: str) -> list[str]:
    return [line for line in capfd_text.splitlines() if LOG_LINE.match(line)]


def test_stage_logs_are_short_sentences(tmp_path, monkeypatch, capfd, caplog):
    """Every INFO line of the stages: no dict dump, at most 200 characters; the plan in one line."""
    if not (data_dir().is_dir() and (models_dir() / "stories260K").is_dir()):
        pytest.skip("local datasets/models folders not present")
    from pipeline import base, capture, compress, data, evaluate, recover

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAYERFOLD_DATA_DIR", str(data_dir()))
    monkeypatch.setenv("LAYERFOLD_MODELS_DIR", str(models_dir()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(compose(REPO / "conf", TINY), sort_keys=False))
    for step in (base.main, data.main, capture.main, compress.main, recover.main, lambda: evaluate.main("compressed", str(COMPRESSED))):
        step()  # each stage's start() sends the log to stderr, which capfd holds
    captured = capfd.readouterr()
    lines = _info_lines(captured.err + captured.out)
    assert len(lines) >= 6
    assert not [line for line in lines if "{'" in line or '{"' in line], "dict dumps at INFO"
    assert not [line for line in lines if len(line) > 200], "log lines over 200 characters"
    # whole corpora are tokenized at once on purpose: the tokenizer's too-long warning is noise, however it is formatted
    noise = "longer than the specified maximum sequence length"
    assert noise not in captured.err + captured.out and not [r for r in caplog.records if noise in r.getMessage()]
    compress_line = next(line for line in lines if "[compress] shortgpt: 5 -> 3 layers" in line)
    assert compress_line.split(" in ")[1].split(": ", 1)[1].startswith("removed layers")
    assert any("[evaluate@compressed] wikitext2 perplexity:" in line for line in lines)

    # checkpoints: a card on each; the recovered folder (recovery=none) is a real checkpoint
    for folder in (COMPRESSED, RECOVERED):
        card = (tmp_path / folder / CARD_FILE).read_text()
        assert card.startswith("---\nlibrary_name: transformers\ntags:\n- layerfold\n")
        assert "sha256: `" in card and "- plan: removed layers" in card and "shortgpt" in card
        assert str(tmp_path) not in card and "from_pretrained" in card
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / RECOVERED)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / COMPRESSED)
    ids = torch.randint(0, 512, (1, 8))
    assert torch.equal(stock(ids).logits, ours(ids).logits)


def test_plan_in_one_line():
    plan = LayerPlan(30)
    plan.remove(range(11, 19))
    assert describe_plan(plan.to_json()) == "removed layers 11-18 (8 of 30)"
    plan = LayerPlan(30)
    plan.merge(23, [24, 25])
    assert describe_plan(plan.to_json()) == "merged 23-25 -> 23 (3 of 30 layers into 1)"
    plan = LayerPlan(80)
    for base in range(70, 0, -10):
        plan.merge(base, [base + 1])
    line = describe_plan(plan.to_json())
    assert line.endswith("2 more (14 of 80 layers into 7)") and len(line) < 200


def test_model_card_is_deterministic_and_says_how_to_load(tmp_path):
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 3, "layerfold_source": {"name": "m", "file": "m.bin", "sha256": "ab"}}')
    card = dict(title="m, 3 of 5 layers", path_hint="artifacts/compressed", method={"name": "shortgpt", "num_remove": 2, "x": [1, 2]},
                plan_line="removed layers 2, 3 (2 of 5)", base_model_id="org/m")
    text = model_card(tmp_path, **card)
    assert text == model_card(tmp_path, **card)
    assert "base_model: org/m" in text and "`shortgpt` (num_remove=2, x=<2 entries>)" in text
    assert "AutoModelForCausalLM.from_pretrained(\"artifacts/compressed\")" in text
    (tmp_path / "layerfold_replacements.safetensors").write_bytes(b"")
    assert "load_checkpoint(\"artifacts/compressed\")" in model_card(tmp_path, **card)  # a side file: layerfold's loader


@pytest.mark.parametrize("switch", ["env", "flag"])
def test_config_errors_are_one_line_and_the_traceback_is_behind_a_switch(tmp_path, switch):
    code = ("from layerfold.io import install_error_hook; install_error_hook('validate'); "
            "from layerfold.config import ConfigError; raise ConfigError('method.num_remove=40: at most 29; lower it')")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("LAYERFOLD_DEBUG", None), env.pop("LAYERFOLD_TRACEBACK", None)
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines()[-1:] == ["[validate] ConfigError: method.num_remove=40: at most 29; lower it"]
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([sys.executable, "-c", code, *(["--debug"] if switch == "flag" else [])],
                           env={**env, **({"LAYERFOLD_DEBUG": "1"} if switch == "env" else {})}, capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_wandb_runs_land_inside_the_project(tmp_path, monkeypatch):
    from layerfold.tracking import run_dir

    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(REPO)
    cfg = OmegaConf.create(yaml.safe_load((REPO / "conf/tracking/disabled.yaml").read_text()))
    assert run_dir(cfg) == REPO
    # wandb writes <dir>/wandb/offline-run-*: git ignores it
    ignored = subprocess.run(["git", "check-ignore", "-q", "wandb/offline-run-x/run.wandb"], cwd=REPO)
    assert ignored.returncode == 0
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # under `dvc exp run`: the main workspace
    assert run_dir(cfg) == tmp_path


def test_plots_page_needs_no_network(tmp_path):
    """`dvc plots show` on the plots dvc.yaml lists writes a page with no http(s) reference and one image per plot."""
    if shutil.which("dvc") is None:
        pytest.skip("dvc is not installed")
    check = _script("check_plots_offline")
    assert check.network_references('<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>') == ["https://cdn.jsdelivr.net/npm/vega@5"]
    plots = check.listed_plots(REPO / "dvc.yaml")
    assert "reports/plots/perplexity.png" in plots and "reports/plots/recovery_curve.png" in plots
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": spec["plots"]}))
    png = (REPO / "reports/plots/layer_importance.png").read_bytes()
    for plot in plots:
        (tmp_path / plot).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / plot).write_bytes(png)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "plots", "show", "--out", "page"], cwd=tmp_path, check=True, capture_output=True)
    html = (tmp_path / "page" / "index.html").read_text()
    assert check.network_references(html) == []
    assert html.count("<img") == len(plots)
