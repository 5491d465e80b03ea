"""The hub defaults every layerfold entry point gets on import (layerfold.env)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

from layerfold.env import HUB_OFF_MESSAGE, hub_configured, offline_defaults

SRC = Path(__file__).resolve().parents[2] / "src"


def test_unset_and_unconfigured_turns_the_hub_off_with_one_line(tmp_path, caplog):
    env = {"HF_HOME": str(tmp_path)}
    with caplog.at_level(logging.WARNING, logger="layerfold"):
        assert offline_defaults(env) is True
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"
    assert [r.getMessage() for r in caplog.records] == [HUB_OFF_MESSAGE]
    assert "HF_HUB_OFFLINE=0" in HUB_OFF_MESSAGE


def test_a_value_the_user_set_is_kept(tmp_path, caplog):
    for preset in ({"HF_HUB_OFFLINE": "0"}, {"HF_DATASETS_OFFLINE": "0"}, {"HF_HUB_OFFLINE": ""}):
        env = {"HF_HOME": str(tmp_path), **preset}
        with caplog.at_level(logging.WARNING, logger="layerfold"):
            assert offline_defaults(env) is False
        assert env == {"HF_HOME": str(tmp_path), **preset}
    assert not caplog.records


def test_a_configured_hub_is_left_on(tmp_path):
    assert not hub_configured({"HF_HOME": str(tmp_path)})
    for extra in ({"HF_TOKEN": "hf_x"}, {"HUGGING_FACE_HUB_TOKEN": "hf_x"}, {"HF_ENDPOINT": "https://mirror.example"}):
        env = {"HF_HOME": str(tmp_path), **extra}
        assert offline_defaults(env) is False and "HF_HUB_OFFLINE" not in env
    (tmp_path / "token").write_text("hf_x")  # huggingface-cli login
    env = {"HF_HOME": str(tmp_path)}
    assert offline_defaults(env) is False and "HF_HUB_OFFLINE" not in env


def test_importing_layerfold_in_a_fresh_shell_sets_the_hub_off_before_huggingface_hub_reads_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HOME=str(tmp_path), PYTHONPATH=str(SRC))
    code = ("import layerfold, os, huggingface_hub.constants as c; "
            "print(os.environ['HF_HUB_OFFLINE'], os.environ['HF_DATASETS_OFFLINE'], c.HF_HUB_OFFLINE)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "1", "True"]
    assert done.stderr.strip().splitlines() == [HUB_OFF_MESSAGE]
    env["HF_HUB_OFFLINE"] = "0"  # the user's choice stands, silently
    code = "import layerfold, os; print(os.environ['HF_HUB_OFFLINE'], os.environ.get('HF_DATASETS_OFFLINE', 'unset'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "unset"] and HUB_OFF_MESSAGE not in done.stderr
