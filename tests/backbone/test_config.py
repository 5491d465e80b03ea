"""conf/ composes into the committed params.yaml, and bad keys fail with their name."""


import pytest
import yaml
from conftest import REPO
from layerfold.config import ConfigError, compose, load_params
from layerfold.methods import get_method


def compose_conf(overrides: list[str] = ()) -> dict:
    return compose(REPO / "conf", overrides)


def test_committed_params_match_conf():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert compose_conf() == committed, "params.yaml is stale: run `dvc exp run` (or scripts/compose_params.py)"


@pytest.mark.parametrize("group", ["method", "compensate", "model", "eval", "data", "tracking", "recovery"])
def test_every_group_entry_composes_and_validates(group, tmp_path):
    for entry in sorted((REPO / "conf" / group).glob("*.yaml")):
        params = compose_conf([f"{group}={entry.stem}"])
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        loaded = load_params(path)
        get_method(loaded.method)


def test_experiment_presets_compose(tmp_path):
    for entry in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        params = compose_conf([f"+experiment={entry.stem}"])
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        get_method(load_params(path).method)


def test_misspelt_key_names_itself(tmp_path):
    params = compose_conf()
    params["data"]["calibraton"] = params["data"].pop("calibration")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"data\.calibraton.*Did you mean 'calibration'"):
        load_params(path)


def test_wrong_type_is_reported(tmp_path):
    params = compose_conf()
    params["eval"]["perplexity"]["seq_len"] = "long"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="seq_len"):
        load_params(path)


def test_method_keys_are_validated_by_the_method():
    with pytest.raises(ConfigError, match="num_remov"):
        get_method({"name": "shortgpt", "num_remov": 3})
    with pytest.raises(ConfigError, match="Unknown method 'shortgtp'"):
        get_method({"name": "shortgtp"})


def test_stage_params_are_granular():
    """Each stage depends only on the groups it reads, so an eval knob never re-runs capture."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "eval" not in stages["capture"]["params"] and "method" not in stages["capture"]["params"]
    assert stages["compress"]["params"] == ["method", "compensate", "hardware", "runtime"]
    assert {"eval.perplexity", "eval.lm_eval"} <= set(stages["evaluate"]["do"]["params"])  # its eval sections, not eval.headline


def test_validate_runs_before_every_stage_and_timings_feed_nothing():
    """`base` (upstream of all model stages) waits for `validate`; `data` follows the data directory's
    fingerprint; timings sit in files no stage reads nor writes as an output (top-level metrics, git-ignored),
    so a re-run changes nothing downstream and no hash in dvc.lock."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "artifacts/validated.json" in stages["base"]["deps"]
    assert stages["validate"]["params"] == [{"params.yaml": None}]
    assert "data/local_files.json" in stages["data"]["deps"] and stages["data_files"]["always_changed"]
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    timings = {"metrics/compress_time.json", "metrics/recover_time.json"}
    assert timings <= set(pipeline["metrics"])
    ignored = (REPO / ".gitignore").read_text().splitlines()
    for name, stage in stages.items():
        deps = stage.get("deps", []) + stage.get("do", {}).get("deps", [])
        outs = [next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics", "plots") for o in stage.get(key, [])]
        assert not timings & set(deps) and not timings & set(outs), name
    assert all(f"/{path}" in ignored for path in timings)
