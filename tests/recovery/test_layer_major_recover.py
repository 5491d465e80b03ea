"""Layer-local distillation under hardware=sequential: the same training as the resident engine, layer by layer.

stories260K (5 layers, tied embeddings) in float32 on the CPU: the teacher's span targets computed once
from the base checkpoint's shards, only the trained layers of the compressed checkpoint materialised,
the same engine loop and batch order. Trained weights, losses, the validation LM loss and the written
checkpoint are held to the resident run's; a deliberately shifted target shows the comparison is tight
enough to notice one boundary of difference.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, data_dir, load_benchmark, models_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from layerfold.config import RecoveryConfig, compose
from layerfold.execution import SafetensorsLayerLoader
from layerfold.models import get_adapter, load_checkpoint, save_checkpoint
from layerfold.models.fingerprint import seal_plan
from layerfold.recovery import RecoveryConfigError, RecoveryEngine, Span, plan_spans
from layerfold.recovery.layer_major import (
    LayerMajorLMLoss,
    StoredTargets,
    check_layer_major,
    layer_major_engine,
    layer_weights,
    partial_student,
    save_recovered,
)
from layerfold.surgery import LayerPlan, remove_layers

STORIES = models_dir() / "stories260K"
DEVICE = {"mode": "sequential", "activations": "device"}
HOST = {"mode": "sequential", "activations": "host", "prefetch": True, "batch_size": 2}
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models only: one intra-op thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def base(stories):
    """``(checkpoint dir, tokenizer)``: stories260K saved in float32 (the execution tests' fixture)."""
    path, _, tokenizer = stories
    return path, tokenizer


@pytest.fixture(scope="module")
def compressed(base, tmp_path_factory):
    """``removed -> (checkpoint dir, plan)``: the base model without the layers ``removed``, saved as the compress stage does."""
    made = {}

    def make(removed: tuple[int, ...]):
        if removed not in made:
            path, tokenizer = base
            model, _ = load_checkpoint(path, "cpu", torch.float32)
            plan = LayerPlan(get_adapter(model).num_layers(model))
            remove_layers(model, list(removed))
            plan.remove(list(removed))
            out = tmp_path_factory.mktemp("compressed") / "-".join(map(str, removed))
            save_checkpoint(model, tokenizer, out, dtype=torch.float32)
            made[removed] = (out, {**plan.to_json(), "details": {}})
        return made[removed]

    return make


def recovery_cfg(mode: str = "distill", **overrides) -> OmegaConf:
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(REPO / "conf", [f"recovery={mode}"])["recovery"])
    # 3 rows per micro-batch over 10 rows: every epoch ends with a short micro-batch of 1
    cfg.merge_with({"max_steps": 5, "batch_size": 3, "grad_accum": 2, "lr": 1e-2, "min_lr": 1e-3, "log_every": 1,
                    "eval_every": 2, "checkpoint_every": 1000, "data": {"seq_len": 32}, **overrides})
    return cfg


def blocks(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 512, (rows, 32), generator=torch.Generator().manual_seed(seed))


TRAIN, VAL = blocks(10, 1), blocks(5, 2)


def resident(base_dir, compressed_dir, plan, cfg, **kwargs):
    teacher, _ = load_checkpoint(base_dir, "cpu", torch.float32)
    teacher.requires_grad_(False)
    student, _ = load_checkpoint(compressed_dir, "cpu", torch.float32)
    engine = RecoveryEngine(student, teacher, plan, cfg, TRAIN, VAL, progress=False, **kwargs)
    return engine, *engine.run()


def layer_major(base_dir, compressed_dir, plan, cfg, hardware=DEVICE, **kwargs):
    engine = layer_major_engine(base_dir, compressed_dir, plan, cfg, TRAIN, VAL, hardware, "cpu", torch.float32, progress=False, **kwargs)
    return engine, *engine.run()


def trained_layers(model, layers):
    decoder = get_adapter(model).get_layers(model)
    return {f"{k}.{name}": t for k in layers for name, t in layer_weights(decoder[k]).items()}


def assert_same_weights(ours, theirs, layers, **tol):
    mine, wanted = trained_layers(ours, layers), trained_layers(theirs, layers)
    assert mine.keys() == wanted.keys()
    for name in wanted:
        torch.testing.assert_close(mine[name], wanted[name], **(tol or WEIGHT_TOL), msg=name)


# -- the same training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("removed, overrides", [
    ((2, 3), {}),  # one new layer, span 1..4
    ((1, 3), {"local": {"order": "sequential"}}),  # two new layers, one phase each
    ((1, 3), {"lora": {"enabled": True}}),  # LoRA adapters on the two new layers, merged at the end
])
def test_layer_major_training_matches_resident(base, compressed, removed, overrides):
    path, plan = compressed(removed)
    cfg = recovery_cfg(**overrides)
    res_engine, res_model, res_summary = resident(base[0], path, plan, cfg)
    engine, model, summary = layer_major(base[0], path, plan, cfg)

    assert engine.partial and summary["layers_trained"] == res_summary["layers_trained"]
    assert_same_weights(model, res_model, summary["layers_trained"])
    assert [p["name"] for p in summary["phases"]] == [p["name"] for p in res_summary["phases"]]
    for ours, theirs in zip(summary["phases"], res_summary["phases"]):
        assert (ours["steps"], ours["tokens"]) == (theirs["steps"], theirs["tokens"])
        assert ours["val_before"] == pytest.approx(theirs["val_before"], rel=1e-5)
        assert ours["val_after"] == pytest.approx(theirs["val_after"], rel=1e-5)
    assert [p["loss"] for p in engine.curve] == pytest.approx([p["loss"] for p in res_engine.curve], rel=1e-5)
    assert [v["val_loss"] for v in engine.validation] == pytest.approx([v["val_loss"] for v in res_engine.validation], rel=1e-5)
    # the whole student's LM loss, layer by layer (LoRA folded in before the merge) against its resident forward
    assert summary["val_lm_loss_before"] == pytest.approx(res_summary["val_lm_loss_before"], rel=1e-5)
    assert summary["val_lm_loss_after"] == pytest.approx(res_summary["val_lm_loss_after"], rel=1e-5)
    assert summary["val_lm_loss_after"] != pytest.approx(summary["val_lm_loss_before"], rel=1e-5)  # training changed the student
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("replacement", ["transformer_layer", "ffn"])
def test_streamline_replacement_trains_as_resident(base, tmp_path, replacement):
    """LLM-Streamline's MSE path: a window of 3 layers replaced by one (compressed resident), trained layer by layer."""
    from layerfold.methods import MethodContext, compress

    path, tokenizer = base
    model, _ = load_checkpoint(path, "cpu", torch.float32)
    plan = compress(MethodContext(model, tokenizer, blocks(4, 3), batch_size=2), {"name": "streamline", "num_remove": 2, "replacement": replacement})
    save_checkpoint(model, tokenizer, tmp_path / "compressed", dtype=torch.float32)
    layer = plan["details"]["replacement_layer"]
    cfg = recovery_cfg()
    _, res_model, res_summary = resident(path, tmp_path / "compressed", plan, cfg)
    _, seq_model, summary = layer_major(path, tmp_path / "compressed", plan, cfg)
    assert summary["layers_trained"] == res_summary["layers_trained"] == [layer]
    assert summary["spans"] == {layer: [layer, layer + 3]}
    assert_same_weights(seq_model, res_model, [layer])
    attention = get_adapter(seq_model).get_layers(seq_model)[layer].self_attn.o_proj.weight
    assert (attention == 0).all() == (replacement == "ffn")  # the FFN replacement's attention stays zero (frozen)


def test_host_activations_train_the_same_weights_as_device(base, compressed):
    path, plan = compressed((2, 3))
    cfg = recovery_cfg()
    on_device, device_model, _ = layer_major(base[0], path, plan, cfg, DEVICE)
    on_host, host_model, _ = layer_major(base[0], path, plan, cfg, HOST)
    assert on_device.targets.execution["stored_activations"] == "device" and on_host.targets.execution["stored_activations"] == "host"
    assert all(t.device.type == "cpu" and not t.is_cuda for a in on_host.targets.kept.values() for t in a.hidden)
    assert on_host.targets.batch_rows == 2 and on_device.targets.batch_rows == 3  # hardware.batch_size, else recovery.batch_size
    assert_same_weights(host_model, device_model, [1], rtol=0, atol=0)


class ShiftedTargets:
    """Stored targets read one boundary too late (input and output), as an off-by-one would."""

    def __init__(self, stored: StoredTargets) -> None:
        self.stored = stored

    def fetch(self, split, rows, input_ids, spans):
        inputs, outputs = self.stored.fetch(split, rows, input_ids, [Span(s.layer, s.start + 1, s.end + 1) for s in spans])
        return {s.start: inputs[s.start + 1] for s in spans}, {s.end: outputs[s.end + 1] for s in spans}

    def teacher_flops_per_token(self, spans):
        return 0.0


def test_targets_shifted_by_one_boundary_fail_the_comparison(base, compressed):
    """The negative control of the tests above: their tolerance notices a one-boundary shift."""
    path, plan = compressed((2, 3))
    cfg = recovery_cfg()
    _, res_model, _ = resident(base[0], path, plan, cfg)
    span = plan_spans(plan, 3, 5)[1]
    assert (span.start, span.end) == (1, 4)
    loader = SafetensorsLayerLoader(path)
    shifted = StoredTargets.compute(base[0], [Span(1, 2, 5)], TRAIN, VAL, DEVICE, "cpu", torch.float32, cfg.batch_size)
    lm_loss = LayerMajorLMLoss(loader, [1], VAL, DEVICE, "cpu", torch.float32, cfg.batch_size)
    engine = RecoveryEngine(partial_student(loader, [1], "cpu"), None, plan, cfg, TRAIN, VAL, progress=False,
                            targets=ShiftedTargets(shifted), lm_loss=lm_loss)
    model, _ = engine.run()
    with pytest.raises(AssertionError):
        assert_same_weights(model, res_model, [1])


def test_targets_refuse_rows_they_were_not_computed_for(base):
    stored = StoredTargets.compute(base[0], [Span(1, 1, 4)], TRAIN, VAL, DEVICE, "cpu", torch.float32, 3)
    spans = [Span(1, 1, 4)]
    rows = torch.tensor([4, 0, 9])
    inputs, outputs = stored.fetch("train", rows, TRAIN[rows], spans)
    assert inputs[1][0].shape == (3, 32, 64) and outputs[4].shape == (3, 32, 64)
    assert sorted(stored.calls) == [1, 2, 3]  # full micro-batches, train's short last one (10 % 3), val's (5 % 3)
    with pytest.raises(ValueError, match="do not hold the token ids"):
        stored.fetch("val", rows[:2], TRAIN[rows[:2]], spans)
    with pytest.raises(ValueError, match="No layer arguments were recorded for a batch of 4"):
        stored.fetch("train", torch.arange(4), TRAIN[:4], spans)


def test_targets_that_would_not_fit_are_refused_before_the_teacher_pass(base, monkeypatch):
    from layerfold.models.resources import InsufficientMemoryError
    from layerfold.recovery import layer_major as module

    stored = (TRAIN.numel() + VAL.numel()) * 2 * 64 * 4  # tokens x 2 boundaries x 64 hidden units x 4 bytes
    monkeypatch.setattr(module, "available_bytes", lambda where: stored)  # exactly that much: the 10 % headroom is missing
    monkeypatch.setattr(module, "runner", lambda *a, **k: pytest.fail("the teacher pass started"))
    with pytest.raises(InsufficientMemoryError, match=r"lower recovery.data.train_tokens \(about 432 tokens fit"):
        StoredTargets.compute(base[0], [Span(1, 1, 4)], TRAIN, VAL, HOST, "cpu", torch.float32, 3)


# -- resume, the checkpoint, bad settings ---------------------------------------------------------------
def test_killed_run_resumes_to_the_same_weights(base, compressed, tmp_path):
    path, plan = compressed((1, 3))
    cfg = recovery_cfg(max_steps=5, checkpoint_every=2, local={"order": "sequential"})
    _, reference, _ = layer_major(base[0], path, plan, cfg)

    class Killed(Exception):
        pass

    def kill(phase: str, step: int) -> None:
        if phase == "local:1" and step == 3:
            raise Killed

    with pytest.raises(Killed):
        layer_major(base[0], path, plan, cfg, state_dir=tmp_path, on_step=kill)
    assert (tmp_path / "state.pt").exists()
    _, resumed, summary = layer_major(base[0], path, plan, cfg, state_dir=tmp_path)  # a fresh process: targets recomputed
    assert_same_weights(resumed, reference, [0, 1], rtol=0, atol=0)
    assert [p["steps"] for p in summary["phases"]] == [5, 5] and not (tmp_path / "state.pt").exists()


def test_recovered_checkpoint_written_layer_by_layer_matches_the_resident_save(base, compressed, tmp_path):
    path, plan = compressed((2, 3))
    cfg = recovery_cfg(lora={"enabled": True})
    _, res_model, _ = resident(base[0], path, plan, cfg)
    _, model, summary = layer_major(base[0], path, plan, cfg)
    tokenizer = base[1]
    save_checkpoint(res_model, tokenizer, tmp_path / "resident", dtype=torch.float32)
    save_recovered(model, summary["layers_trained"], path, tokenizer, tmp_path / "sequential", torch.float32,
                   extra_json={"plan.json": {**plan, "recovery": {"name": "distill"}}})
    theirs, ours = load_file(tmp_path / "resident" / "model.safetensors"), load_file(tmp_path / "sequential" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    compressed_tensors = load_file(path / "model.safetensors")
    for key, tensor in theirs.items():
        if key.startswith("model.layers.1."):
            torch.testing.assert_close(ours[key], tensor, **WEIGHT_TOL)
            assert not torch.equal(ours[key], compressed_tensors[key]) or key.endswith("norm.weight")  # trained
        else:
            assert torch.equal(ours[key], tensor) and torch.equal(ours[key], compressed_tensors[key]), key  # streamed unchanged
    assert json.loads((tmp_path / "sequential" / "plan.json").read_text())["recovery"] == {"name": "distill"}
    reloaded, _ = load_checkpoint(tmp_path / "sequential")
    ids = TRAIN[:2]
    torch.testing.assert_close(reloaded(ids).logits, load_checkpoint(tmp_path / "resident")[0](ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_layer_weights_are_the_merged_weights():
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_model

    model = tiny_model("llama")
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["model.layers.1.self_attn.q_proj",
                                                                                                  "model.layers.1.mlp.down_proj"]))
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # B starts at zero: give the adapters an effect
    folded = layer_weights(get_adapter(wrapped.base_model.model).get_layers(wrapped.base_model.model)[1])
    plain = wrapped.merge_and_unload()
    merged = get_adapter(plain).get_layers(plain)[1].state_dict()
    assert folded.keys() == merged.keys()
    for key in merged:
        assert torch.equal(folded[key], merged[key]), key
    assert not torch.equal(folded["self_attn.q_proj.weight"], get_adapter(model).get_layers(model)[1].self_attn.q_proj.weight)


@pytest.mark.parametrize("mode, overrides", [("come", {}), ("lm", {}), ("lora", {}), ("distill", {"end_to_end": {"enabled": True}})])
def test_end_to_end_recovery_is_refused_before_anything_loads(mode, overrides):
    cfg = recovery_cfg(mode, **overrides)
    with pytest.raises(RecoveryConfigError, match=r"recovery.end_to_end.enabled=true.*hardware=sequential.*hardware=resident"):
        layer_major_engine("/nonexistent/base", "/nonexistent/compressed", {}, cfg, TRAIN, VAL, DEVICE, "cpu", torch.float32)


def test_nothing_to_train_is_the_engines_error_before_any_teacher_pass(base):
    plan = {**LayerPlan(5).to_json(), "details": {}}  # nothing removed: no layer stands for more than one
    with pytest.raises(RecoveryConfigError, match="selects no layer"):
        layer_major_engine(base[0], base[0], plan, recovery_cfg(), TRAIN, VAL, DEVICE, "cpu", torch.float32)


def test_several_processes_are_refused():
    with pytest.raises(RecoveryConfigError, match="one process, but 2 were launched"):
        check_layer_major(recovery_cfg(), processes=2)
    check_layer_major(recovery_cfg(lora={"enabled": True}))  # layer-local with LoRA runs layer-major


def test_partial_student_holds_only_its_trained_layers(base, compressed):
    path, _ = compressed((2, 3))
    student = partial_student(path, [1], "cpu")
    decoder = get_adapter(student).get_layers(student)
    assert not any(p.is_meta for p in decoder[1].parameters())
    assert all(p.is_meta for k in (0, 2) for p in decoder[k].parameters())
    assert student.get_input_embeddings().weight.is_meta and next(decoder[1].parameters()).dtype == torch.float32


# -- the stage -----------------------------------------------------------------------------------------
STAGE_PARAMS = [
    "model=stories260k", "method.num_remove=2", "eval.perplexity.seq_len=128", "recovery=distill", "recovery.data.seq_len=64", "recovery.data.train_tokens=1024", "recovery.data.val_blocks=4",
    "recovery.max_steps=3", "recovery.batch_size=3", "recovery.log_every=1", "recovery.lr=1e-2",
]


def test_recover_stage_under_sequential_matches_resident(base, compressed, tmp_path, monkeypatch):
    """``python -m pipeline.recover`` both ways on the same artifacts: the same checkpoint, metrics with the execution report."""
    if not data_dir().is_dir():
        pytest.skip("local datasets folder not present (set LAYERFOLD_DATA_DIR)")
    from pipeline import recover
    from layerfold.stage import BASE, COMPRESSED, METRICS, RECOVERED, RECOVERY_STATE

    path, plan = compressed((2, 3))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAYERFOLD_DATA_DIR", str(data_dir()))
    monkeypatch.setenv("LAYERFOLD_MODELS_DIR", str(models_dir()))
    shutil.copytree(base[0], BASE)
    shutil.copytree(path, COMPRESSED)
    (COMPRESSED / "plan.json").write_text(json.dumps(seal_plan(plan, COMPRESSED)))  # as compress writes it
    runs, curves = {}, {}
    for hardware in ("resident", "sequential"):
        overrides = [*STAGE_PARAMS, f"hardware={hardware}"] + (["hardware.activations=host"] if hardware == "sequential" else [])
        Path("params.yaml").write_text(yaml.safe_dump(compose(REPO / "conf", overrides), sort_keys=False))
        recover.main()
        shutil.copytree(RECOVERED, tmp_path / hardware)
        runs[hardware] = {**json.loads((METRICS / "recover.json").read_text()), **json.loads((METRICS / "recover_time.json").read_text())}
        curves[hardware] = [float(r["loss"]) for r in csv.DictReader(open(METRICS / "recover_curve.csv"))]
        assert not RECOVERY_STATE.exists()
    theirs, ours = runs["resident"], runs["sequential"]
    assert theirs["execution"] == {"mode": "resident"} and ours["execution"]["mode"] == "sequential"
    targets = ours["execution"]["teacher_targets"]
    assert targets["stored_boundaries"] == [1, 4] and targets["stored_activations"] == "host" and targets["layers_run"] == 4
    assert len(ours["execution"]["lm_loss_passes"]) == 2 and ours["layers_trained"] == theirs["layers_trained"] == [1]
    for key in ("val_lm_loss_before", "val_lm_loss_after"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5)
    assert curves["sequential"] == pytest.approx(curves["resident"], rel=1e-5) and len(curves["resident"]) == 3
    assert ours["train_tokens_processed"] == theirs["train_tokens_processed"] == 3 * 3 * 64
    assert {k: ours[k] for k in ours if k.startswith("params_")} == {k: theirs[k] for k in theirs if k.startswith("params_")}
    resident_tensors = load_file(tmp_path / "resident" / "model.safetensors")
    sequential_tensors = load_file(tmp_path / "sequential" / "model.safetensors")
    assert sequential_tensors.keys() == resident_tensors.keys()
    for key, tensor in resident_tensors.items():
        torch.testing.assert_close(sequential_tensors[key], tensor, **WEIGHT_TOL, msg=key)
    recovered_plan = json.loads((tmp_path / "sequential" / "plan.json").read_text())
    assert recovered_plan["recovery"] == json.loads((tmp_path / "resident" / "plan.json").read_text())["recovery"]


# -- the benchmark --------------------------------------------------------------------------------------
def test_benchmark_runs_the_tiny_shape_on_cpu(tmp_path):
    out = tmp_path / "sequential_distill.json"
    record = load_benchmark("sequential_distill").main(["--shape", "tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == record
    assert set(record) == {"benchmark", "environment", "settings", "rows", "notes"}
    rows = {r["name"]: r for r in record["rows"]}
    assert list(rows) == ["parity", "teacher targets", "train step", "lm loss pass", "total"]
    assert rows["parity"]["met"] is True and rows["parity"]["targets_max_rel_diff"] <= 1e-5
    assert rows["teacher targets"]["layers_run"] == 3 and rows["teacher targets"]["stored_boundaries"] == [1, 3]  # window 1..2
    assert rows["train step"]["steps"] == 4 and rows["train step"]["repeats"] == 3 and rows["train step"]["tokens_per_s"] > 0
    assert rows["lm loss pass"]["repeats"] == 2 and rows["lm loss pass"]["layers_run"] == 3  # 4 layers, the window's second removed
    assert rows["total"]["met"] is True and record["settings"]["span"] == [1, 3]
