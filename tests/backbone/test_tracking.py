"""wandb tracking: off by default, offline runs named after the DVC experiment with the full config."""

import pytest
from omegaconf import OmegaConf

from layerfold.config import Params
from layerfold.tracking import init_run


def params(mode: str, tmp_path) -> OmegaConf:
    cfg = OmegaConf.structured(Params)
    cfg.method = {"name": "shortgpt", "num_remove": 8}
    cfg.tracking.mode = mode
    cfg.tracking.dir = str(tmp_path)
    return cfg


def test_disabled_is_a_no_op(tmp_path):
    run = init_run(params("disabled", tmp_path), "evaluate")
    run.log({"x": 1})
    run.finish()
    assert list(tmp_path.iterdir()) == []


def test_offline_run_is_named_after_the_experiment_and_logs_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-3")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = init_run(params("offline", tmp_path), "compress")
    try:
        assert run.name == "sweep-3-compress"
        assert run.config["method"]["num_remove"] == 8 and run.config["tracking"]["mode"] == "offline"
        run.log({"compress/seconds": 1.5})
    finally:
        run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tracking.mode"):
        init_run(params("sometimes", tmp_path), "compress")
