"""The recovery engine on tiny random models: exact layer calls, schedules, modes, resume and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import REPO, tiny_model
from layerfold.config import RecoveryConfig, compose
from layerfold.models.adapters import get_adapter
from layerfold.recovery import PlanMismatchError, RecoveryConfigError, RecoveryEngine, Span, local_span_losses, plan_spans
from layerfold.recovery.local import call_layer
from layerfold.recovery.teacher import TeacherTaps
from layerfold.recovery.schedule import lr_at
from layerfold.surgery import LayerPlan, remove_layers


def recovery_cfg(mode: str, **overrides) -> OmegaConf:
    # composed as Hydra does (lm/lora/come extend distill.yaml through their defaults list)
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(REPO / "conf", [f"recovery={mode}"])["recovery"])
    cfg.merge_with({"max_steps": 4, "batch_size": 4, "lr": 1e-2, "min_lr": 1e-3, "log_every": 1, **overrides})
    return cfg


def eager_llama(layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, attn_implementation="eager")
    return AutoModelForCausalLM.from_config(config).eval()


def removed(model: torch.nn.Module, positions: list[int]) -> tuple[torch.nn.Module, dict]:
    """A copy of ``model`` without ``positions`` and its plan (as ShortGPT would leave it)."""
    student = copy.deepcopy(model)
    plan = LayerPlan(get_adapter(model).num_layers(model))
    remove_layers(student, positions)
    plan.remove(positions)
    return student, {**plan.to_json(), "details": {}}


def tokens(n: int, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


# -- exact layer calls -------------------------------------------------------------------------------
def test_copy_of_one_layer_block_has_zero_loss():
    """Student layer = the teacher's own layer for a one-layer span: the loss is exactly 0 (eager attention)."""
    teacher = eager_llama()
    student = copy.deepcopy(teacher)
    spans = [Span(layer=k, start=k, end=k + 1) for k in range(4)]
    for loss in local_span_losses(teacher, student, spans, tokens(2), "mse"):
        assert loss.item() == 0.0


def test_ignore_first_leaves_the_leading_positions_out_of_the_loss():
    teacher = eager_llama()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        get_adapter(student).get_layers(student)[1].mlp.down_proj.weight.mul_(1.5)
    spans, ids = [Span(1, 1, 2)], tokens(2)
    full = local_span_losses(teacher, student, spans, ids, "mse")[0]
    rest = local_span_losses(teacher, student, spans, ids, "mse", ignore_first=4)[0]
    assert full.item() > 0 and rest.item() > 0 and rest.item() != full.item()
    layer = get_adapter(student).get_layers(student)[1]
    with TeacherTaps(teacher, spans) as taps:
        taps.run(teacher, ids)
    hidden, kwargs = taps.inputs[1]
    expected = torch.nn.functional.mse_loss(call_layer(layer, hidden, kwargs)[:, 4:], taps.outputs[2][:, 4:])
    assert rest.item() == pytest.approx(expected.item())


def test_bidirectional_attention_would_fail_the_copy_test():
    """Without the model's causal mask, eager attention sees the future: the same copy no longer matches."""
    teacher = eager_llama()
    layer = get_adapter(teacher).get_layers(teacher)[1]
    with TeacherTaps(teacher, [Span(1, 1, 2)]) as taps:
        taps.run(teacher, tokens(2))
    hidden, kwargs = taps.inputs[1]
    assert torch.equal(call_layer(layer, hidden, kwargs), taps.outputs[2])
    no_mask = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    assert not torch.allclose(call_layer(layer, hidden, no_mask), taps.outputs[2], atol=1e-5)


def test_student_layer_call_is_causal():
    """Changing the last position's input leaves every earlier position's output unchanged."""
    teacher = eager_llama()
    layer = get_adapter(teacher).get_layers(teacher)[2]
    with TeacherTaps(teacher, [Span(2, 2, 3)]) as taps:
        taps.run(teacher, tokens(1))
    hidden, kwargs = taps.inputs[2]
    changed = hidden.clone()
    changed[:, -1] += 5.0
    a, b = call_layer(layer, hidden, kwargs), call_layer(layer, changed, kwargs)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6) and not torch.allclose(a[:, -1], b[:, -1])


# -- spans -------------------------------------------------------------------------------------------
def test_spans_absorb_removed_layers_into_the_layer_before():
    _, plan = removed(tiny_model("llama"), [1, 2])
    spans = plan_spans(plan, student_layers=2, teacher_layers=4)
    assert [(s.start, s.end) for s in spans] == [(0, 3), (3, 4)]
    assert [s.is_new for s in spans] == [True, False]
    _, plan = removed(tiny_model("llama"), [0])
    assert [(s.start, s.end) for s in plan_spans(plan, 3, 4)] == [(0, 2), (2, 3), (3, 4)]


def test_plan_not_matching_the_model_is_an_error():
    student, plan = removed(tiny_model("llama"), [1])
    with pytest.raises(PlanMismatchError, match="compressed model has 2"):
        plan_spans(plan, student_layers=2, teacher_layers=4)
    with pytest.raises(PlanMismatchError, match="dense model has 5"):
        plan_spans(plan, student_layers=3, teacher_layers=5)
    with pytest.raises(PlanMismatchError, match="consecutive"):
        plan_spans({"original_layers": 4, "layers": [{"stands_for": [0, 2]}, {"stands_for": [3]}]}, 2, 4)
    with pytest.raises(PlanMismatchError):
        RecoveryEngine(student, tiny_model("llama", seed=1), {**plan, "original_layers": 5}, recovery_cfg("distill"), tokens(8), tokens(4))


# -- schedule ----------------------------------------------------------------------------------------
def test_schedule_warms_up_then_decays_to_the_floor_per_optimizer_step():
    teacher = tiny_model("llama")
    student, plan = removed(teacher, [1])
    cfg = recovery_cfg("distill", max_steps=10, grad_accum=3, batch_size=2, warmup_ratio=0.2, lr=1e-3, min_lr=1e-4)
    engine = RecoveryEngine(student, teacher, plan, cfg, tokens(40), tokens(4), progress=False)
    engine.run()
    lrs = [p["lr"] for p in engine.curve]  # the LR each of the 10 optimiser steps used
    assert lrs == pytest.approx([lr_at(s, 10, 2, 1e-3, 1e-4) for s in range(10)])
    assert lrs[:2] == pytest.approx([5e-4, 1e-3]) and lrs[-1] == pytest.approx(1e-4)  # warmup, then the floor at the end
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # never rises again after warmup
    assert engine.curve[-1]["tokens"] == 10 * 3 * 2 * 16


# -- modes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["mse", "cosine", "kl"])
def test_local_distillation_lowers_the_span_loss(loss):
    teacher = tiny_model("llama")
    student, plan = removed(teacher, [1, 2])
    cfg = recovery_cfg("distill", max_steps=15, lr=3e-3, min_lr=3e-3, local={"loss": loss, "temperature": 0.1})
    engine = RecoveryEngine(student, teacher, plan, cfg, tokens(32), tokens(8, seed=2), progress=False)
    _, summary = engine.run()
    phase = summary["phases"][0]
    assert summary["layers_trained"] == [0]
    assert phase["val_after"] < phase["val_before"]


def test_sequential_order_trains_one_layer_per_phase():
    teacher = tiny_model("llama")
    student, plan = removed(teacher, [1, 3])
    cfg = recovery_cfg("distill", local={"order": "sequential"})
    _, summary = RecoveryEngine(student, teacher, plan, cfg, tokens(16), tokens(4), progress=False).run()
    assert [p["name"] for p in summary["phases"]] == ["local:0", "local:1"]


def test_lm_mode_changes_only_the_trainable_layer():
    teacher = tiny_model("llama")
    student, plan = removed(teacher, [1, 2])
    before = {n: p.clone() for n, p in student.named_parameters()}
    model, _ = RecoveryEngine(student, None, plan, recovery_cfg("lm"), tokens(16), tokens(4), progress=False).run()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.0.") for n in changed)


def test_lora_is_merged_into_a_vanilla_model(tmp_path):
    teacher = tiny_model("llama")
    student, plan = removed(teacher, [2])
    before = {n: p.clone() for n, p in student.named_parameters()}
    model, summary = RecoveryEngine(student, None, plan, recovery_cfg("lora"), tokens(16), tokens(4), progress=False).run()
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert set(dict(model.named_parameters())) == set(before)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".layers." in n)
    assert summary["trained_parameters"] > 0
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tokens(1)
    assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


def test_come_mode_runs_local_then_logit_kd():
    teacher = tiny_model("llama")
    student, plan = removed(teacher, [1])
    _, summary = RecoveryEngine(student, teacher, plan, recovery_cfg("come"), tokens(16), tokens(4), progress=False).run()
    assert [p["name"] for p in summary["phases"]] == ["local", "end_to_end"]


# -- resume --------------------------------------------------------------------------------------------
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    teacher = tiny_model("llama")
    cfg = recovery_cfg("come", max_steps=5, checkpoint_every=2, grad_accum=2, batch_size=2)
    data, val = tokens(24), tokens(4)

    student, plan = removed(teacher, [1, 2])
    reference, _ = RecoveryEngine(student, teacher, plan, cfg, data, val, progress=False).run()

    class Killed(Exception):
        pass

    def kill(phase: str, step: int) -> None:
        if phase == "end_to_end" and step == 3:
            raise Killed

    student, plan = removed(teacher, [1, 2])
    with pytest.raises(Killed):
        RecoveryEngine(student, teacher, plan, cfg, data, val, state_dir=tmp_path, on_step=kill, progress=False).run()
    assert (tmp_path / "state.pt").exists()
    student, plan = removed(teacher, [1, 2])  # a fresh process: untrained student again
    resumed, summary = RecoveryEngine(student, teacher, plan, cfg, data, val, state_dir=tmp_path, progress=False).run()
    for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert [p["steps"] for p in summary["phases"]] == [5, 5]
    assert not (tmp_path / "state.pt").exists()


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    ({"lr": 0.0}, "recovery.lr=0.0 must be > 0"),
    ({"lr": -1e-3}, "must be > 0"),
    ({"min_lr": 1.0}, "recovery.min_lr"),
    ({"local": {"enabled": False}}, "enables neither"),
])
def test_bad_settings_fail_before_training(overrides, match):
    teacher = tiny_model("llama")
    student, plan = removed(teacher, [1])
    with pytest.raises(RecoveryConfigError, match=match):
        RecoveryEngine(student, teacher, plan, recovery_cfg("distill", **overrides), tokens(8), tokens(4))


def test_nothing_new_to_train_is_an_error():
    teacher = tiny_model("llama")
    _, plan = removed(teacher, [3])
    assert plan_spans(plan, 3, 4)[-1].is_new  # even a removed last layer is absorbed by the layer before it
    plan = {**LayerPlan(4).to_json(), "details": {}}  # nothing removed or merged: no layer is new
    with pytest.raises(RecoveryConfigError, match="selects no layer"):
        RecoveryEngine(copy.deepcopy(teacher), teacher, plan, recovery_cfg("distill"), tokens(8), tokens(4))
