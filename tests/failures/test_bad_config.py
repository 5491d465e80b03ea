"""Bad settings fail at once, naming the key, the bad value, the allowed range and the fix."""

from __future__ import annotations

import dataclasses
import shutil
import typing

import pytest
from conftest import REPO
from hydra.errors import MissingConfigException

from layerfold.config import ConfigError, Params, compose, parse_params
from layerfold.methods import REGISTRY, _load_all, get_method
from layerfold.models.facts import ModelFacts
from layerfold.validation import check

SMOLLM2 = ModelFacts(model_type="llama", num_layers=30, context_length=8192, vocab_size=49152)

pytestmark = pytest.mark.hostile(input="config", stage="validate", expect=("message", "intact"))


def composed(*overrides: str) -> dict:
    return compose(REPO / "conf", list(overrides))


def fails(overrides: list[str], facts: ModelFacts | None = SMOLLM2) -> str:
    """The ConfigError message for ``overrides``, from composing through the model check."""
    with pytest.raises(ConfigError) as err:
        check(parse_params(composed(*overrides)), facts)
    return str(err.value)


@pytest.mark.parametrize(
    ("override", "key", "rule"),
    [
        ("data.calibration.num_blocks=-1", "data.calibration.num_blocks=-1", ">= 1"),
        ("data.calibration.num_blocks=0", "data.calibration.num_blocks=0", ">= 1"),
        ("data.calibration.seq_len=1", "data.calibration.seq_len=1", ">= 2"),
        ("eval.perplexity.seq_len=0", "eval.perplexity.seq_len=0", ">= 2"),
        ("eval.perplexity.max_windows=0", "eval.perplexity.max_windows=0", ">= 1"),
        ("eval.perplexity.max_windows=-1", "eval.perplexity.max_windows=-1", ">= 1"),
        ("eval.perplexity.batch_size=0", "eval.perplexity.batch_size=0", ">= 1"),
        ("capture.batch_size=0", "capture.batch_size=0", ">= 1"),
        ("eval.lm_eval.batch_size=0", "eval.lm_eval.batch_size=0", ">= 1"),
        ("runtime.dtype=float8", "runtime.dtype='float8'", "one of auto, float32"),
        ("data.calibration.chunking=sentences", "data.calibration.chunking='sentences'", "one of concat, per_document"),
    ],
)
def test_out_of_range_values_name_key_value_range_and_fix(override, key, rule):
    message = fails([override], facts=None)
    assert key in message and rule in message
    assert f"dvc exp run -S {key.split('=')[0]}=" in message  # the fix


def test_every_problem_is_reported_at_once():
    message = fails(["data.calibration.num_blocks=0", "capture.batch_size=0"], facts=None)
    assert "data.calibration.num_blocks=0" in message and "capture.batch_size=0" in message


@pytest.mark.parametrize("key", ["data.calibration.seq_len", "eval.perplexity.seq_len", "eval.lm_eval.max_length"])
def test_sequence_length_beyond_the_context_is_refused(key):
    message = fails([f"{key}=8193"])
    assert f"{key}=8193" in message and "<= context_length = 8192" in message
    check(parse_params(composed(f"{key}=8192")), SMOLLM2)  # the context itself is fine


def test_efficiency_prompt_plus_generation_must_fit_the_context():
    message = fails(["eval.efficiency.prompt_len=8000", "eval.efficiency.new_tokens=500"])
    assert "prompt_len + new_tokens" in message and "8192" in message


@pytest.mark.parametrize("method", ["shortgpt", "drop_last", "gromov", "sleb"])
def test_target_depth_must_stay_below_the_current_depth(method):
    message = fails([f"method={method}", "method.num_remove=30"])
    assert "method.num_remove=30" in message and "< num_layers = 30" in message
    deepest = 28 if method == "sleb" else 29  # SLEB never removes its protected first and last layer
    check(parse_params(composed(f"method={method}", f"method.num_remove={deepest}")), SMOLLM2)


def test_unknown_method_is_named():
    with pytest.raises(ConfigError, match="Unknown method 'foo'. Registered methods: .*shortgpt"):
        check(parse_params(composed("method.name=foo")), None)


def test_misspelt_method_key_in_params_yaml_is_named():
    raw = composed()
    raw["method"]["num_remvoe"] = 6
    with pytest.raises(ConfigError, match=r"unknown key 'method.num_remvoe'.*Did you mean 'num_remove'"):
        check(parse_params(raw), None)


def test_misspelt_eval_key_is_named():
    raw = composed()
    raw["eval"]["perplexity"]["max_window"] = 2
    with pytest.raises(ConfigError, match=r"unknown key 'eval.perplexity.max_window'.*Did you mean 'max_windows'"):
        parse_params(raw)


def test_misspelt_override_gets_a_layerfold_message_not_hydras_plus_hint():
    with pytest.raises(ConfigError) as err:
        composed("method.num_remvoe=6")
    message = str(err.value)
    assert "Unknown setting 'method.num_remvoe'" in message and "Did you mean 'method.num_remove'" in message
    assert "To append to your config use +" not in message


def test_preset_naming_a_missing_config_is_named(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "experiment" / "broken.yaml").write_text("# @package _global_\ndefaults:\n  - override /method: shortgtp\n")
    with pytest.raises(MissingConfigException, match="shortgtp"):
        compose(conf, ["+experiment=broken"])


def test_every_numeric_setting_declares_its_range():
    """The contract the checker relies on: no count, size or rate without bounds."""
    _load_all()
    schemas = [(f"method '{name}'", spec.config) for name, spec in REGISTRY.items()]
    missing = []
    for where, schema in [("params", Params), *schemas]:
        missing += [f"{where}: {f}" for f in _unbounded_numeric_fields(schema)]
    assert not missing, f"numeric fields without metadata ranges: {missing}"


def _unbounded_numeric_fields(schema: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(schema)
    found = []
    for spec in dataclasses.fields(schema):
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            found += _unbounded_numeric_fields(hint, f"{prefix}{spec.name}.")
            continue
        numeric = {int, float} & set(typing.get_args(hint) or (hint,))
        if numeric and not ({"ge", "gt", "le", "lt", "choices"} & set(spec.metadata)):
            found.append(prefix + spec.name)
    return found


def test_method_ranges_apply_through_get_method():
    with pytest.raises(ConfigError, match=r"method.num_remove=0 is not allowed: it must be >= 1"):
        get_method({"name": "shortgpt", "num_remove": 0})


def test_method_that_needs_the_resident_model_stops_in_validate_under_sequential():
    with pytest.raises(ConfigError, match=r"method.replacement=mlp.*hardware=sequential.*hardware=resident"):
        check(parse_params(composed("method=streamline", "method.replacement=mlp", "hardware=sequential")), SMOLLM2)
    for method in ("sleb", "come", "come_p"):  # layer-major methods pass
        check(parse_params(composed(f"method={method}", "hardware=sequential")), SMOLLM2)


@pytest.mark.parametrize("overrides", [["recovery=lm"], ["recovery=lora"], ["recovery=come"],
                                       ["recovery=distill", "recovery.end_to_end.enabled=true"]])
def test_end_to_end_recovery_stops_in_validate_under_sequential(overrides):
    message = fails([*overrides, "hardware=sequential"])
    assert "recovery.end_to_end.enabled=true" in message and "hardware=sequential" in message
    assert "-S hardware=resident" in message  # the fix
    check(parse_params(composed(*overrides)), SMOLLM2)  # resident: fine


def test_layer_local_recovery_passes_validate_under_sequential():
    check(parse_params(composed("recovery=distill", "hardware=sequential")), SMOLLM2)
    check(parse_params(composed("recovery=distill", "recovery.lora.enabled=true", "hardware=sequential")), SMOLLM2)


@pytest.mark.parametrize(("method", "needed"), [
    (["method=streamline", "method.num_remove=8"], 9),  # a replaced window: 9 layers, both ends compared
    (["method=streamline", "method.num_remove=8", "method.replacement=none"], 8),
])
def test_capture_must_keep_the_pairs_the_method_reads(method, needed):
    message = fails([*method, f"capture.max_distance={needed - 1}"], facts=None)
    assert f"capture.max_distance={needed - 1}" in message and f"reads boundaries {needed} apart" in message
    assert f"-S capture.max_distance={needed}" in message
    check(parse_params(composed(*method, f"capture.max_distance={needed}")), None)
    check(parse_params(composed("method=shortgpt", "capture.max_distance=1")), None)  # Block Influence: adjacent pairs
