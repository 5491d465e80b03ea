"""What the recover stage refuses is refused before any stage: by `validate` (layerfold.validation.check, with and
without the model's facts) and by `scripts/compose_params.py`, which leaves params.yaml as it was."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO, data_dir
from layerfold.config import ConfigError, compose, parse_params
from layerfold.models.facts import ModelFacts
from layerfold.recovery.engine import RecoveryEngine
from layerfold.recovery.errors import RecoveryConfigError
from layerfold.recovery.layer_major import check_layer_major
from layerfold.validation import check

STORIES = ModelFacts("llama", 5, 512, 512)
TINY = ["model=stories260k", "data.calibration.seq_len=64", "eval.perplexity.seq_len=128", "data.benchmarks=[]", "eval.lm_eval.tasks=[]", "eval.efficiency.enabled=false", "method.num_remove=2"]
TRAINING = ["recovery.data.seq_len=64", "recovery.data.train_tokens=1024", "recovery.max_steps=1"]

# (overrides, what the refusal says); each is something RecoveryEngine.check or the layer-major recover refuses.
CASES = {
    "min_lr above lr": (["recovery=distill", "recovery.min_lr=0.5"], "recovery.min_lr=0.5 must lie in [0, recovery.lr=0.0002]"),
    "ignore_first fills the block": (["recovery=distill", "recovery.local.ignore_first=64", *TRAINING],
                                     "recovery.local.ignore_first=64 leaves no position of a 64-token block"),
    "no phase enabled": (["recovery=distill", "recovery.local.enabled=false"], "enables neither local.enabled nor end_to_end.enabled"),
    "end to end layer by layer": (["recovery=lm", "hardware=sequential"], "it cannot run with hardware=sequential"),
    "unknown local loss": (["recovery=distill", "recovery.local.loss=huber"], "recovery.local.loss"),
    "lora on every parameter": (["recovery=lora", "recovery.trainable=all"], "recovery.lora.enabled with trainable=all"),
    "end to end without a loss": (["recovery=lm", "recovery.end_to_end.lm_weight=0"], "lm_weight=0 and kd_weight=0"),
    "optimizer that does not import": (["recovery=distill", "recovery.optimizer._target_=torch.optim.Adamx"],
                                       "recovery.optimizer._target_='torch.optim.Adamx' does not import"),
    "argument the optimizer does not take": (["recovery=distill", "+recovery.optimizer.momentum=0.9"],
                                             "recovery.optimizer.momentum=0.9 is not a parameter of torch.optim.AdamW"),
    "schedule argument set twice": (["recovery=distill", "+recovery.schedule.min_lr=0.0"],
                                    "recovery.schedule reads min_lr from recovery.min_lr; set that instead"),
}


@pytest.fixture(autouse=True)
def local_data(monkeypatch):
    if not data_dir().is_dir():
        pytest.skip("local datasets folder not present (set LAYERFOLD_DATA_DIR)")
    monkeypatch.setenv("LAYERFOLD_DATA_DIR", str(data_dir()))


def _recover_refuses(overrides: list[str]) -> bool:
    """Whether the recover stage (its params loading and its own checks, run after every earlier stage) refuses these settings."""
    try:
        params = parse_params(compose(REPO / "conf", [*TINY, *overrides]), "test")
        RecoveryEngine.check(params.recovery, 1)
        if params.hardware.mode == "sequential":
            check_layer_major(params.recovery, 1)
    except (RecoveryConfigError, ConfigError):
        return True
    return False


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("facts", [None, STORIES], ids=["no-model", "stories260k"])
def test_validate_refuses_what_recover_refuses(case, facts):
    overrides, message = CASES[case]
    assert _recover_refuses(overrides), "the case must be one the recover stage refuses"
    with pytest.raises(ConfigError) as err:  # parsing (the schema's ranges) or the check
        check(parse_params(compose(REPO / "conf", [*TINY, *overrides]), "test"), facts)
    assert message in str(err.value)


def _compose_params():
    spec = importlib.util.spec_from_file_location("compose_params", REPO / "scripts" / "compose_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", sorted(CASES))
def test_compose_params_refuses_and_keeps_params_yaml(case, monkeypatch, capsys):
    overrides, message = CASES[case]
    monkeypatch.chdir(REPO)
    before = (REPO / "params.yaml").read_bytes()
    assert _compose_params().main([*TINY, *overrides]) == 1
    assert message in capsys.readouterr().err
    assert (REPO / "params.yaml").read_bytes() == before


def test_the_refused_settings_pass_when_corrected():
    """The checks refuse the cases, not the presets around them."""
    for overrides in (["recovery=distill"], ["recovery=distill", "hardware=sequential"], ["recovery=lm"], ["recovery=lora"]):
        assert not _recover_refuses(overrides)
        check(parse_params(compose(REPO / "conf", [*TINY, *overrides]), "test"), STORIES)
