"""recovery.trainable = last (lm_head + final norm + last k layers) and patch (LinearPatch only); top-k logit KD."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import REPO, tiny_model
from layerfold.compensate import compress_and_compensate
from layerfold.config import RecoveryConfig, compose
from layerfold.methods import MethodContext
from layerfold.models.adapters import get_adapter
from layerfold.models.patches import ATTRIBUTE
from layerfold.recovery import RecoveryConfigError, RecoveryEngine
from layerfold.recovery.losses import kl_per_token, logit_kd
from layerfold.surgery import LayerPlan, remove_layers


def recovery_cfg(mode: str, **overrides) -> OmegaConf:
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(REPO / "conf", [f"recovery={mode}"])["recovery"])
    cfg.merge_with({"max_steps": 3, "batch_size": 4, "lr": 1e-2, "min_lr": 1e-3, "log_every": 1, **overrides})
    return cfg


def tokens(n: int, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def dropped_last(model: torch.nn.Module, n: int) -> tuple[torch.nn.Module, dict]:
    student = copy.deepcopy(model)
    layers = get_adapter(model).num_layers(model)
    plan = LayerPlan(layers)
    remove_layers(student, range(layers - n, layers))
    plan.remove(range(layers - n, layers))
    return student, {**plan.to_json(), "details": {}}


def tied_llama(layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_last_trains_the_head_the_final_norm_and_the_last_layers_only(tied, one_thread):
    teacher = tied_llama() if tied else tiny_model("llama")
    student, plan = dropped_last(teacher, 1)
    layers = get_adapter(student).num_layers(student)
    before = {n: p.clone() for n, p in student.named_parameters()}
    model, summary = RecoveryEngine(student, None, plan, recovery_cfg("lm", trainable="last", last_layers=2), tokens(16), tokens(4),
                                    progress=False).run()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trained_layers = {f"model.layers.{k}." for k in range(layers - 2, layers)}
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"  # tied: the head is the embedding, reported under its name
    assert head in changed and "model.norm.weight" in changed
    assert {n for n in changed if n.startswith("model.layers.")} and all(
        n.startswith(tuple(trained_layers)) for n in changed if n.startswith("model.layers."))
    assert summary["layers_trained"] == list(range(layers - 2, layers))


def test_last_layers_beyond_the_student_are_refused(one_thread):
    teacher = tiny_model("llama")
    student, plan = dropped_last(teacher, 2)
    with pytest.raises(RecoveryConfigError, match=r"recovery.last_layers=5 but the student has 2 decoder layers"):
        RecoveryEngine(student, None, plan, recovery_cfg("lm", trainable="last", last_layers=5), tokens(8), tokens(4))
    with pytest.raises(RecoveryConfigError, match="lora.enabled=false"):
        RecoveryEngine(student, None, plan, recovery_cfg("lora", trainable="last"), tokens(8), tokens(4))


def test_patch_kd_trains_the_patches_alone(one_thread):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    plan = compress_and_compensate(MethodContext(student, None, tokens(8)), {"name": "gromov", "num_remove": 2}, {"name": "linear_patch"})
    before = {n: p.clone() for n, p in student.named_parameters()}
    model, summary = RecoveryEngine(student, teacher, plan, recovery_cfg("patch_kd", **{"data": {"seq_len": 16}}), tokens(16), tokens(4),
                                    progress=False).run()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(f"{ATTRIBUTE}.") for n in changed)
    assert summary["phases"][0]["val_after"] < summary["phases"][0]["val_before"]


def test_patch_without_patches_is_refused(one_thread):
    teacher = tiny_model("llama")
    student, plan = dropped_last(teacher, 1)
    with pytest.raises(RecoveryConfigError, match="compensate=linear_patch"):
        RecoveryEngine(student, teacher, plan, recovery_cfg("patch_kd"), tokens(8), tokens(4))


def test_top_k_kd_is_the_kl_over_the_teachers_top_k_renormalised():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 40, generator=generator), torch.randn(2, 5, 40, generator=generator)
    assert torch.allclose(logit_kd(student, teacher, 1.0, top_k=40), logit_kd(student, teacher, 1.0))
    index = teacher.topk(7, dim=-1).indices
    expected = kl_per_token(student.gather(-1, index), teacher.gather(-1, index), 1.0).mean()
    assert torch.allclose(logit_kd(student, teacher, 1.0, top_k=7), expected)
    assert not torch.allclose(logit_kd(student, teacher, 1.0, top_k=7), logit_kd(student, teacher, 1.0))
    assert float(logit_kd(teacher, teacher, 1.0, top_k=7)) == pytest.approx(0.0, abs=1e-6)
