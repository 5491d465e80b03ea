"""One set of recovery defaults: conf/recovery/distill.yaml (the base every training recovery composes from)
and the recovery dataclasses of layerfold.config hold the same values, and recovery=none composes to the
same checked settings whatever the dataclass defaults are."""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from conftest import REPO
from layerfold.config import RecoveryConfig, compose, parse_params


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_recovery_default_is_the_yaml_value():
    defaults = _leaves(OmegaConf.to_container(OmegaConf.structured(RecoveryConfig)))
    yaml_values = _leaves(OmegaConf.to_container(OmegaConf.load(REPO / "conf/recovery/distill.yaml")))
    assert set(defaults) == set(yaml_values), "conf/recovery/distill.yaml and RecoveryConfig name different settings"
    differing = {k: (defaults[k], yaml_values[k]) for k in defaults if k != "name" and defaults[k] != yaml_values[k]}
    assert not differing, f"dataclass default != conf/recovery/distill.yaml: {differing}"
    assert defaults["name"] == "none" == OmegaConf.load(REPO / "conf/recovery/none.yaml").name


def test_every_recovery_preset_sets_only_keys_the_dataclass_has():
    for path in sorted((REPO / "conf/recovery").glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        raw.pop("defaults", None)
        unknown = set(_leaves(raw)) - set(_leaves(OmegaConf.to_container(OmegaConf.structured(RecoveryConfig))))
        assert not unknown, f"{path.name}: {unknown}"


def test_a_composed_recovery_does_not_depend_on_the_dataclass_defaults():
    """The pipeline composes the YAML, so each training recovery's values come from conf/, not from the schema."""
    fields = {f.name for f in dataclasses.fields(RecoveryConfig)}
    for mode in ("distill", "lm", "lora", "come", "patch_kd"):
        composed = compose(REPO / "conf", [f"recovery={mode}"])["recovery"]
        assert fields <= set(composed), f"recovery={mode} leaves {fields - set(composed)} to the dataclass"
        assert OmegaConf.to_container(parse_params(compose(REPO / "conf", [f"recovery={mode}"])).recovery) == composed
