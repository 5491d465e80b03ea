"""Bad input for ReplaceMe, the compensations and the trainable selectors fails in validate, naming the fix."""

from __future__ import annotations

import pytest
from conftest import REPO

from layerfold.config import ConfigError, compose, parse_params
from layerfold.models.facts import ModelFacts
from layerfold.validation import check

SMOLLM2 = ModelFacts(model_type="llama", num_layers=30, context_length=8192, vocab_size=49152)


def fails(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        check(parse_params(compose(REPO / "conf", list(overrides))), SMOLLM2)
    return str(err.value)


def passes(*overrides: str) -> None:
    check(parse_params(compose(REPO / "conf", list(overrides))), SMOLLM2)


@pytest.mark.parametrize(("method", "why"), [
    (["method=laco"], "merges layers"),
    (["method=mka"], "merges layers"),
    (["method=come"], "concatenation"),
    (["method=replaceme"], "folds a fitted map"),
    (["method=streamline"], "replaces its window"),
])
@pytest.mark.parametrize("compensate", ["prune_comp", "linear_patch"])
def test_compensation_after_a_merging_method_is_refused(method, why, compensate):
    message = fails(*method, f"compensate={compensate}")
    assert f"compensate={compensate}" in message and why in message and "-S compensate=none" in message


@pytest.mark.parametrize("method", [["method=shortgpt"], ["method=gromov"], ["method=sleb"], ["method=drop_last"],
                                    ["method=streamline", "method.replacement=none"]])
def test_compensation_after_a_removal_method_passes(method):
    passes(*method, "compensate=prune_comp")
    passes(*method, "compensate=linear_patch")


def test_linear_patch_needs_the_resident_model():
    message = fails("compensate=linear_patch", "hardware=sequential")
    assert "hardware=sequential" in message and "-S hardware=resident" in message
    passes("compensate=prune_comp", "hardware=sequential")  # folded into the weights: layer by layer is fine
    passes("method=replaceme", "hardware=sequential")


def test_a_replaceme_window_the_model_does_not_have_is_refused():
    message = fails("method=replaceme", "method.start=25")
    assert "method.start=25" in message and "layers 25..32" in message and "1..22" in message
    assert "method.start=0 is not allowed" in fails("method=replaceme", "method.start=0")
    passes("method=replaceme", "method.start=22")


def test_replaceme_cosine_selection_needs_the_block_pairs_captured():
    message = fails("method=replaceme", "method.selection=cosine", "capture.max_distance=1")
    assert "-S capture.max_distance=8" in message
    passes("method=replaceme", "capture.max_distance=1")  # angular selection reads the last-token statistics


def test_selector_settings_are_checked():
    assert "compensate=linear_patch" in fails("recovery=patch_kd")
    passes("recovery=patch_kd", "compensate=linear_patch")
    assert "recovery.last_layers=25 but the compressed model keeps 22 layers" in fails("recovery=lm", "recovery.trainable=last",
                                                                                       "recovery.last_layers=25")
    assert "lora.enabled=false" in fails("recovery=lora", "recovery.trainable=last")
    assert "-S hardware=resident" in fails("recovery=distill", "recovery.trainable=last", "hardware=sequential")


def test_qlora_preset_is_refused_without_bitsandbytes():
    import importlib.util

    message = fails("+experiment=gromov_qlora_llama2_7b")  # SMOLLM2 facts: the preset's declared model is not what is checked here
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "needs bitsandbytes, which is not installed" in message and "recovery.lora.quantize=none" in message
    else:
        assert "not implemented" in message
