"""Recovery's optimiser, schedule and losses as Hydra components: the defaults train exactly as the explicit torch
objects they replace, another component can be named in conf, and the flat keys stay where the values are set."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, tiny_model
from layerfold.config import RecoveryConfig, compose
from layerfold.models.adapters import get_adapter
from layerfold.recovery import RecoveryEngine
from layerfold.recovery.components import component_problems
from layerfold.recovery.losses import EndToEndLoss, LocalLoss
from layerfold.recovery.schedule import warmup_cosine
from layerfold.surgery import LayerPlan, remove_layers

# What the recovery engine trained before its optimiser, schedule and losses became components (recovery.max_steps=6,
# batch 4, 16 blocks of 16 tokens, a tiny random Llama without layers 1 and 2): the logged loss of every optimiser step.
BEFORE = {
    "lm": [4.845144271850586, 4.867465496063232, 4.849640846252441, 4.843639850616455, 4.832608699798584, 4.836280822753906],
    "come": [0.0001252522924914956, 0.00011852531315525994, 0.00012251145381014794, 0.00011102186545031145, 0.00010505770478630438,
             0.00014982237189542502, 0.0014314597938209772, 0.0014669487718492746, 0.0014279031893238425, 0.0015040487051010132,
             0.0013860227772966027, 0.0014961841516196728],
}
EXPLICIT: dict = {}  # the settings the explicit objects below read (set by the test)


def explicit_adamw(params: list[dict], **_: object) -> torch.optim.AdamW:
    """The optimiser as the engine built it before: AdamW from the flat keys, no weight decay on biases and norms."""
    cfg = EXPLICIT["cfg"]
    return torch.optim.AdamW([{"params": params[0]["params"], "weight_decay": cfg.weight_decay}, {"params": params[1]["params"], "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def explicit_schedule(optimizer: torch.optim.Optimizer, total_steps: int, **_: object) -> torch.optim.lr_scheduler.LambdaLR:
    cfg = EXPLICIT["cfg"]
    return warmup_cosine(optimizer, total_steps, cfg.warmup_ratio, cfg.lr, cfg.min_lr)


def recovery_cfg(mode: str, *overrides: str) -> OmegaConf:
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(REPO / "conf", [f"recovery={mode}", *overrides])["recovery"])
    cfg.merge_with({"max_steps": 6, "batch_size": 4, "log_every": 1})
    return cfg


def tokens(n: int, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def train(cfg) -> tuple[torch.nn.Module, RecoveryEngine]:
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    plan = LayerPlan(get_adapter(teacher).num_layers(teacher))
    remove_layers(student, [1, 2])
    plan.remove([1, 2])
    engine = RecoveryEngine(student, teacher, {**plan.to_json(), "details": {}}, cfg, tokens(16), tokens(4), progress=False)
    model, _ = engine.run()
    return model, engine


@pytest.mark.parametrize("mode", sorted(BEFORE))
def test_the_default_components_train_as_before(mode, one_thread):
    """Layer-local MSE then logit KD (come) and the LM loss (lm): the curve of the code before components, and the same
    bits as a run whose optimiser and schedule are the explicit torch objects the engine used to build."""
    model, engine = train(recovery_cfg(mode))
    assert [point["loss"] for point in engine.curve] == pytest.approx(BEFORE[mode], rel=1e-5)
    assert isinstance(engine.end_to_end_loss, EndToEndLoss)

    cfg = recovery_cfg(mode)
    EXPLICIT["cfg"] = cfg
    cfg.optimizer = {"_target_": f"{__name__}.explicit_adamw"}
    cfg.schedule = {"_target_": f"{__name__}.explicit_schedule"}
    reference, reference_engine = train(cfg)
    assert [p["loss"] for p in engine.curve] == [p["loss"] for p in reference_engine.curve]
    assert [p["lr"] for p in engine.curve] == [p["lr"] for p in reference_engine.curve]
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(reference.state_dict().items())):
        assert torch.equal(a, b), name


def test_a_component_named_in_conf_is_what_trains(one_thread):
    """SGD with momentum and a constant schedule, named in conf: lr and weight decay still come from the flat keys."""
    cfg = recovery_cfg("lm", "recovery.optimizer._target_=torch.optim.SGD", "+recovery.optimizer.momentum=0.5",
                       "recovery.schedule._target_=torch.optim.lr_scheduler.ConstantLR", "+recovery.schedule.factor=1.0")
    cfg.lr = 0.05
    assert component_problems(cfg) == []
    _, engine = train(cfg)
    assert {point["lr"] for point in engine.curve} == {0.05}


def test_the_components_read_the_flat_keys_set_after_composing():
    """lr, betas and weight decay live in one place: a flat key changed after composing is what the optimiser gets."""
    from layerfold.recovery.components import build

    cfg = recovery_cfg("distill")
    cfg.merge_with({"lr": 3e-3, "beta2": 0.9, "weight_decay": 0.25, "min_lr": 1e-4, "local": {"loss": "cosine", "ignore_first": 2}})
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = build(cfg, "optimizer", [{"params": [weight]}])
    assert (optimizer.defaults["lr"], optimizer.defaults["betas"], optimizer.defaults["weight_decay"]) == (3e-3, (0.9, 0.9), 0.25)
    assert build(cfg, "local.criterion") == LocalLoss("cosine", 1.0, 2, 10.0)
    assert build(cfg, "end_to_end.criterion") == EndToEndLoss(1.0, 0.0, 1.0, None)


@pytest.mark.parametrize(("key", "section", "message"), [
    ("optimizer", {"_target_": "torch.optim.NoSuchOptimizer"}, "recovery.optimizer._target_='torch.optim.NoSuchOptimizer' does not import"),
    ("optimizer", {"_target_": "torch.optim.AdamW", "momentum": 0.9}, "recovery.optimizer.momentum=0.9 is not a parameter of torch.optim.AdamW"),
    ("optimizer", {"_target_": "torch.optim.AdamW", "params": []}, "the recovery engine passes params itself"),
    ("optimizer", {"lr": 1.0}, "recovery.optimizer has no _target_"),
    ("local.criterion", {"_target_": "torch.pi"}, "recovery.local.criterion._target_='torch.pi' is not callable"),
    ("end_to_end.criterion", {"_target_": "layerfold.recovery.losses.EndToEndLoss", "kd_weight": 1.0},
     "recovery.end_to_end.criterion reads kd_weight from recovery.end_to_end.kd_weight; set that instead"),
])
def test_a_bad_component_is_named_with_its_key_value_and_fix(key, section, message):
    cfg = recovery_cfg("distill")
    assert component_problems(cfg) == []
    OmegaConf.update(cfg, key, section, merge=False)
    problems = component_problems(cfg)
    assert len(problems) == 1 and message in problems[0]
