"""Every check whose inputs are params and the model's config runs in `validate`, before DVC deletes a stage's
outputs: each case is refused there with its message (in process, then through `dvc repro` in one shared clone,
where no later stage starts and every earlier output, `cache: false` metrics included, stays as it was)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, data_dir, make_clone, models_dir
from layerfold.config import ConfigError, compose, parse_params
from layerfold.models.facts import ModelFacts
from layerfold.validation import check, check_runtime

STORIES = ModelFacts("llama", 5, 512, 512)
OPT = ModelFacts("opt", 4, 512, 512)
NEOX = ModelFacts("gpt_neox", 4, 512, 512)
TINY = [
    "model=stories260k",
    "data.calibration.num_blocks=8",
    "data.calibration.seq_len=64",
    "data.benchmarks=[]",
    "method.num_remove=2",
    "eval.perplexity.seq_len=128",
    "eval.perplexity.max_windows=1",
    "eval.perplexity.datasets=[wikitext2]",
    "eval.lm_eval.tasks=[]",
    "eval.efficiency.enabled=false",
]
TRAINING = ["recovery.data.seq_len=64", "recovery.data.train_tokens=1024", "recovery.data.val_blocks=4", "recovery.max_steps=1"]

# (overrides, model facts, what the refusal says): each used to fail inside a stage, after DVC deleted its outputs.
CASES = {
    "come target unreachable": (["method=come", "method.num_remove=3"], STORIES, "method.wo_repeat=true cannot reach 2 layers from 5"),
    "come on fused heads": (["method=come", "method.num_remove=1"], NEOX, "CoMe's concatenation merge needs separate query/key/value projections"),
    "mka removes every layer": (["method=mka", "method.num_remove=5"], STORIES, "method.num_remove=5 is not allowed: it must be < num_layers = 5"),
    "mka draws beyond the samples": (["method=mka", "method.draws=2"], STORIES, "data.calibration.num_blocks=8 is too few for method.draws=2"),
    "mka k beyond the samples": (["method=mka", "method.n_neighbors=10", "method.k_entropy=4"], STORIES,
                                 "method.n_neighbors=10 needs more than 10 samples per draw, but there are 8"),
    "swiglu on opt": (["model.name=tiny-opt", "method=streamline", "method.num_remove=1", "method.replacement=swiglu"], OPT,
                      "method.replacement=swiglu needs a SwiGLU FFN, which 'opt' does not have"),
    "mlp on opt": (["model.name=tiny-opt", "method=streamline", "method.num_remove=1", "method.replacement=mlp"], OPT,
                   "method.replacement=mlp needs the MLP to be a submodule"),
    "min_lr above lr": (["recovery=distill", "recovery.min_lr=1e-3", *TRAINING], STORIES, "recovery.min_lr=0.001 must lie in [0, recovery.lr=0.0002]"),
    "ignore_first beyond the block": (["recovery=distill", "recovery.local.ignore_first=64", *TRAINING], STORIES,
                                      "recovery.local.ignore_first=64 leaves no position of a 64-token block"),
    "no phase enabled": (["recovery=distill", "recovery.local.enabled=false", *TRAINING], STORIES,
                         "recovery=distill enables neither local.enabled nor end_to_end.enabled"),
    "end to end without a loss": (["recovery=lm", "recovery.end_to_end.lm_weight=0", *TRAINING], STORIES, "lm_weight=0 and kd_weight=0"),
    "lora on every parameter": (["recovery=lora", "recovery.trainable=all", *TRAINING], STORIES, "recovery.lora.enabled with trainable=all"),
    "training on evaluation text": (["recovery=lm", "recovery.data.sources=[wikitext2_test]", "recovery.data.weights=[1.0]", *TRAINING], STORIES,
                                    "recovery.data.sources has 'wikitext2_test', which is no training source"),
    "hub corpus without a bound": (["recovery=lm", "recovery.data.sources=[hub:allenai/c4]", "recovery.data.weights=[1.0]",
                                    "recovery.data.train_tokens=null", "recovery.max_steps=1"], STORIES, "set recovery.data.train_tokens"),
    "task not prepared": (["eval.lm_eval.tasks=[piqa]"], STORIES, "eval.lm_eval.tasks[0]='piqa' reads the benchmark 'piqa', but data.benchmarks"),
    "task unknown": (["eval.lm_eval.tasks=[pika]"], STORIES, "eval.lm_eval.tasks[0]='pika' is no lm-eval task layerfold runs on local data"),
    "benchmark unknown": (["data.benchmarks=[arc_easy,siqa]"], STORIES, "data.benchmarks has ['siqa'], which layerfold cannot prepare"),
    "sleb protects too much": (["method=sleb", "method.protect_first=2", "method.protect_last=2"], STORIES,
                               "only 1 of the model's 5 layers are not protected"),
    "laco range inverted": (["method=laco", "method.target_layers=null", "method.lowest_layer=3", "method.highest_layer=2"], STORIES,
                            "method.lowest_layer=3 lies above method.highest_layer=2"),
    "preset name over another model": (["model.source=local", "model.path=/models/other"], STORIES,
                                       "model.name='stories260k' names the weights of conf/model/stories260k.yaml"),
}


def composed(overrides: list[str], root: Path = REPO) -> dict:
    """``TINY`` with ``overrides`` composed as `dvc exp run -S` composes them (a chosen method brings its own settings)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    method = next((o.split("=", 1)[1] for o in overrides if o.startswith("method=")), "shortgpt")
    settings = yaml.safe_load((root / "conf" / "method" / f"{method}.yaml").read_text())
    base = [o for o in TINY if o.split("=", 1)[0] not in keys and not (o.startswith("method.") and o.split("=")[0][7:] not in settings)]
    return compose(root / "conf", [*base, *overrides])


@pytest.fixture(autouse=True)
def local_data(monkeypatch):
    if not data_dir().is_dir():
        pytest.skip("local datasets folder not present (set LAYERFOLD_DATA_DIR)")
    monkeypatch.setenv("LAYERFOLD_DATA_DIR", str(data_dir()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_refuses(case):
    overrides, facts, message = CASES[case]
    with pytest.raises(ConfigError) as err:
        check(parse_params(composed(overrides)), facts)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["method=come", "method.num_remove=2"], ["method=mka", "method.num_remove=4", "method.n_neighbors=3", "method.k_entropy=4"],
    ["recovery=lora", *TRAINING],
    ["data.benchmarks=[arc_easy]", "eval.lm_eval.tasks=[arc_easy]"], ["method=sleb", "method.num_remove=3"], ["recovery=come", *TRAINING],
    ["model.source=local", "model.path=/models/other", "model.name=null"],
])
def test_the_settings_around_the_cases_pass(overrides):
    """The checks refuse the cases, not what surrounds them."""
    check(parse_params(composed(overrides)), STORIES)


def test_a_device_this_machine_lacks_is_refused(monkeypatch):
    params = parse_params(composed(["runtime.device=cuda:1"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"runtime.device=cuda:1, but (this torch build has no CUDA support|no CUDA device is visible)"):
        check_runtime(params)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"only 1 CUDA device\(s\) are visible"):
        check_runtime(params)
    check_runtime(parse_params(composed(["runtime.device=cuda:0"])))


# -- through `dvc repro`, in one clone ---------------------------------------------------------------------------
def run(cmd: list[str], cwd: Path, env: dict) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def outputs(repo: Path) -> dict[str, str]:
    """Every stage output's bytes (md5), but validate's own (DVC deletes it before the check) and data_files' (always re-run)."""
    files = [p for folder in ("artifacts", "data/prepared", "metrics") for p in (repo / folder).rglob("*") if p.is_file()]
    skip = {repo / "artifacts/validated.json"}
    return {str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(files) if p not in skip}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    """A clone that ran every stage the cases would re-run, up to the dense evaluation and recovery=none."""
    if not (data_dir().is_dir() and (models_dir() / "stories260K").is_dir()):
        pytest.skip("local datasets/models folders not present")
    repo, env = make_clone(tmp_path_factory.mktemp("validate-early") / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(compose(repo / "conf", TINY), sort_keys=False))
    rc, out = run(["dvc", "repro", "evaluate@dense", "recover"], repo, env)
    assert rc == 0, out[-4000:]
    return repo, env, artifact_json(repo)


def artifact_json(repo: Path) -> dict[str, str]:
    """The JSON files of the outputs later stages read (tokenizer files aside), as written by the run."""
    paths = sorted([*(repo / "artifacts").rglob("*.json"), *(repo / "data/prepared").rglob("*.json")])
    return {p.relative_to(repo).as_posix(): p.read_text() for p in paths if not p.name.startswith(("tokenizer", "special_tokens"))}


def tiny_opt(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=512, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                       max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(folder.parent / "repo" / "artifacts" / "base").save_pretrained(folder)
    return folder


# Cases that fit one params.yaml share one `dvc repro`: validate reports every problem it finds at once.
REPRO_GROUPS = {
    "come, recovery, tasks, device": (["method=come", "method.num_remove=3", "recovery=distill", "recovery.min_lr=1e-3", *TRAINING,
                                       "eval.lm_eval.tasks=[piqa]", "runtime.device=cuda"],
                                      ["come target unreachable", "min_lr above lr", "task not prepared"]),
    "mka depth": (["method=mka", "method.num_remove=5"], ["mka removes every layer"]),
    "mka draws, ignore_first": (["method=mka", "method.draws=2", "recovery=distill", "recovery.local.ignore_first=64", *TRAINING],
                                ["mka draws beyond the samples", "ignore_first beyond the block"]),
    "mka k, no phase": (["method=mka", "method.n_neighbors=10", "method.k_entropy=4", "recovery=distill", "recovery.local.enabled=false", *TRAINING],
                        ["mka k beyond the samples", "no phase enabled"]),
    "opt: swiglu, its name": (["model.source=local", "model.path={opt}", "method=streamline", "method.num_remove=1", "method.replacement=swiglu"],
                              ["swiglu on opt"]),
}


@pytest.mark.parametrize("group", list(REPRO_GROUPS))
def test_dvc_repro_stops_in_validate_with_every_earlier_output_intact(clone, group):
    repo, env, _ = clone
    overrides, cases = REPRO_GROUPS[group]
    opt = repo.parent / "tiny-opt"
    if any("{opt}" in o for o in overrides) and not opt.exists():
        tiny_opt(opt)
    overrides = [o.format(opt=opt) for o in overrides]
    params = (repo / "params.yaml").read_text()
    before = outputs(repo)
    assert {"metrics/dense.json", "metrics/compress.json", "metrics/recover.json", "artifacts/compressed/plan.json"} <= set(before)
    # written as `dvc exp run -S` writes it: composed, not checked
    (repo / "params.yaml").write_text(yaml.safe_dump(composed(overrides, repo), sort_keys=False))
    try:
        rc, out = run(["dvc", "repro"], repo, env)
    finally:
        (repo / "params.yaml").write_text(params)
    assert rc != 0
    for case in cases:
        assert CASES[case][2] in out, f"{case}: {out[-3000:]}"
    if group.startswith("opt"):  # validate read the OPT config, not the stories checkpoint: the name is refused too
        assert "model.name='stories260k' names the weights of conf/model/stories260k.yaml" in out
    if "device" in group and not torch.cuda.is_available():  # a message, not torch's bare AssertionError
        assert "runtime.device=cuda, but this torch build has no CUDA support" in out and "AssertionError" not in out
    started = set(re.findall(r"Running stage '([^']+)'", out))
    assert started <= {"validate", "data_files"}, started
    assert "Traceback" not in out  # a message, not a crash
    assert outputs(repo) == before


TIMING_KEY = re.compile(r"(^|_)(seconds?|secs?|times?|timings?|elapsed|duration|date|timestamp|host|hostname|rss|peak)($|_)")


def test_artifacts_hold_no_times_host_facts_or_paths(clone):
    """Outputs other stages depend on (plan.json, capture statistics, checkpoints, validated.json, prepared data)
    hold no wall times, host facts or absolute paths: a re-run that computes the same thing writes the same bytes."""
    repo, _, written = clone

    def keys(tree, where: str) -> list[str]:
        if isinstance(tree, dict):
            return [f"{where}.{k}" for k in tree if TIMING_KEY.search(str(k))] + [x for k, v in tree.items() for x in keys(v, f"{where}.{k}")]
        if isinstance(tree, list):
            return [x for item in tree for x in keys(item, where)]
        return []

    for name, text in written.items():
        assert str(repo.parent) not in text and "/tmp/" not in text and "/work/" not in text, name
        assert keys(json.loads(text), name) == []
    assert {"artifacts/validated.json", "artifacts/compressed/plan.json", "artifacts/capture/stats.json", "artifacts/base/config.json",
            "artifacts/base/source.json", "artifacts/recovered/plan.json", "data/prepared/calibration/meta.json"} <= set(written)
