"""Layer-local losses: which positions they read (ignore_first, outlier target norms) and the per-position distances."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import REPO
from layerfold.config import ConfigError, RecoveryConfig, compose, validate
from layerfold.recovery import RecoveryConfigError, RecoveryEngine, Span, local_span_losses
from layerfold.recovery.local import call_layer
from layerfold.recovery.teacher import TeacherTaps
from layerfold.recovery.losses import LocalLoss, kept_positions, local_loss, local_loss_per_position


def states(seed: int = 0, batch: int = 2, seq: int = 8, hidden: int = 16, sink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A student and a teacher hidden state; the teacher's (and the student's) position 0 scaled by ``sink``."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, seq, hidden, generator=g)
    student = teacher + 0.3 * torch.randn(batch, seq, hidden, generator=g)
    teacher[:, 0] *= sink
    student[:, 0] *= sink
    return student, teacher


def test_mse_over_every_position_is_the_plain_mse() -> None:
    student, teacher = states()
    assert LocalLoss("mse")(student, teacher).item() == pytest.approx(F.mse_loss(student, teacher).item(), rel=1e-6)
    assert local_loss(student, teacher, "cosine").item() == pytest.approx((1 - F.cosine_similarity(student, teacher, dim=-1)).mean().item(), rel=1e-6)


def test_ignore_first_is_the_loss_of_the_remaining_positions() -> None:
    student, teacher = states()
    for kind in ("mse", "nmse", "cosine", "kl"):
        assert LocalLoss(kind, ignore_first=3)(student, teacher).item() == pytest.approx(
            LocalLoss(kind)(student[:, 3:], teacher[:, 3:]).item(), rel=1e-6), kind


def test_an_attention_sink_dominates_the_mse_and_the_norm_rule_leaves_it_out() -> None:
    """Position 0 with a 100x norm carries almost all of a plain MSE; max_norm_ratio drops exactly that position,
    and the loss then equals the MSE over the other positions."""
    student, teacher = states(sink=100.0)
    per_position = local_loss_per_position(student, teacher, "mse")
    assert float(per_position[:, 0].sum() / per_position.sum()) > 0.99
    keep = kept_positions(teacher, max_norm_ratio=10.0)
    assert keep[:, 1:].all() and not keep[:, 0].any()
    assert LocalLoss("mse", max_norm_ratio=10.0)(student, teacher).item() == pytest.approx(
        F.mse_loss(student[:, 1:], teacher[:, 1:]).item(), rel=1e-6)
    # Without an outlier the rule leaves every position in: the same loss as no rule at all.
    plain_student, plain_teacher = states()
    assert kept_positions(plain_teacher, max_norm_ratio=10.0).all()
    assert LocalLoss("mse", max_norm_ratio=10.0)(plain_student, plain_teacher).item() == LocalLoss("mse")(plain_student, plain_teacher).item()


def test_norm_rule_reads_the_median_of_the_positions_ignore_first_keeps() -> None:
    _, teacher = states(seq=6)
    teacher[:, 0] *= 1000.0
    teacher[:, 3] *= 20.0
    keep = kept_positions(teacher, ignore_first=1, max_norm_ratio=10.0)
    assert not keep[:, 0].any() and not keep[:, 3].any() and keep[:, [1, 2, 4, 5]].all()
    # Never empty: a ratio above 1 keeps at least the positions at or below the median.
    wild = torch.randn(3, 9, 4) * torch.logspace(0, 8, 9).view(1, 9, 1)
    assert (kept_positions(wild, max_norm_ratio=1.0001).sum(1) >= 5).all()


def test_normalised_mse_weighs_every_position_alike() -> None:
    student, teacher = states()
    scaled_student, scaled_teacher = states(sink=100.0)
    # The relative error of position 0 does not change when both states there are scaled...
    torch.testing.assert_close(local_loss_per_position(scaled_student, scaled_teacher, "nmse"),
                               local_loss_per_position(student, teacher, "nmse"))
    # ...and it is |s - t|^2 / |t|^2, averaged over positions.
    expected = ((student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1)).mean()
    assert LocalLoss("nmse")(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)
    assert LocalLoss("nmse")(teacher, teacher).item() == 0.0


def test_span_losses_read_the_configured_positions() -> None:
    """Through the engine's span losses: the student layer called as inside the model, then the norm rule."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, attn_implementation="eager")
    teacher = AutoModelForCausalLM.from_config(config).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.layers[2].mlp.down_proj.weight.mul_(1.5)
    spans, ids = [Span(2, 2, 3)], torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    got = local_span_losses(teacher, student, spans, ids, "mse", ignore_first=1, max_norm_ratio=3.0)[0]
    with TeacherTaps(teacher, spans) as taps:
        taps.run(teacher, ids)
    hidden, kwargs = taps.inputs[2]
    out, target = call_layer(student.model.layers[2], hidden, kwargs), taps.outputs[3]
    keep = kept_positions(target, 1, 3.0)
    expected = local_loss_per_position(out, target, "mse")[keep].mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def recovery(overrides: dict) -> OmegaConf:
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(REPO / "conf", ["recovery=distill"])["recovery"])
    cfg.merge_with(overrides)
    return cfg


def test_bad_norm_ratio_is_refused_with_the_key_and_a_fix() -> None:
    with pytest.raises(RecoveryConfigError, match=r"recovery.local.max_norm_ratio=1.0 must be > 1"):
        RecoveryEngine.check(recovery({"local": {"max_norm_ratio": 1.0}}))
    raw = compose(REPO / "conf", ["recovery=distill"])["recovery"]
    raw["local"]["max_norm_ratio"] = 0.5
    with pytest.raises(ConfigError, match="max_norm_ratio"):
        validate(raw, RecoveryConfig, "recovery", "recovery.")
    raw["local"]["loss"] = "huber"
    raw["local"]["max_norm_ratio"] = None
    with pytest.raises(ConfigError, match="loss"):
        validate(raw, RecoveryConfig, "recovery", "recovery.")


def test_one_source_of_defaults_for_the_local_loss() -> None:
    """The dataclass and conf/recovery/distill.yaml (which come.yaml extends) agree on the local loss settings."""
    schema = OmegaConf.structured(RecoveryConfig).local
    for mode in ("distill", "come"):
        local = compose(REPO / "conf", [f"recovery={mode}"])["recovery"]["local"]
        for key in ("loss", "ignore_first", "max_norm_ratio", "temperature", "order"):
            assert local[key] == schema[key], (mode, key)
