"""layerfold.api: compress and recover from Python compose conf/ like the pipeline, refuse what validate refuses
before touching the model, and give what the compress stage's own function gives on the same input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from layerfold import compress, recover  # layerfold.api, exported by the package
from layerfold.config import ConfigError
from layerfold.models import save_checkpoint
from layerfold.models.tiny import tiny_model, tiny_tokenizer


def _blocks(n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 99, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def dense(tmp_path):
    path = tmp_path / "dense"
    save_checkpoint(tiny_model("llama"), tiny_tokenizer(), path, dtype=torch.float32)
    return path


@pytest.mark.parametrize("method, settings", [("shortgpt", {"num_remove": 1}), ("laco", {"merge_layers": 2, "threshold": -1.0,
                                                                                            "interval": 1, "target_layers": 3})])
def test_compress_equals_the_compress_stage(dense, tmp_path, method, settings, one_thread):
    from omegaconf import OmegaConf

    from layerfold.config import compose
    from layerfold.compression import compress_resident

    blocks = _blocks(8, 12, seed=1)
    model, plan = compress(dense, method=method, calibration=blocks, out=tmp_path / "api", **settings)
    dotted = [f"method.{k}={v}" for k, v in settings.items()]
    stage_method = OmegaConf.create(compose("conf", [f"method={method}", *dotted])).method
    stage_plan, _, _ = compress_resident(dense, blocks, None, stage_method, 4, torch.device("cpu"), torch.float32, torch.float32,
                                         tmp_path / "stage")
    assert plan == stage_plan  # the same plan, sealed to the same weights
    assert len(model.model.layers) == len(plan["layers"]) == 3
    ours, theirs = load_file(tmp_path / "api" / "model.safetensors"), load_file(tmp_path / "stage" / "model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_compress_refuses_before_editing_the_model():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="method.num_remove=4 is not allowed"):
        compress(model, tokenizer=tiny_tokenizer(), method="shortgpt", calibration=_blocks(4, 12, 1), num_remove=4)
    with pytest.raises(ConfigError, match="Unknown method 'shortgtp'. Choose one of come"):
        compress(model, tokenizer=tiny_tokenizer(), method="shortgtp", calibration=_blocks(4, 12, 1))
    assert len(model.model.layers) == 4


def test_recover_trains_with_the_composed_recovery_and_refuses_what_recover_refuses(one_thread):
    teacher, tokenizer = tiny_model("llama"), tiny_tokenizer()
    student, plan = compress(tiny_model("llama"), tokenizer=tokenizer, method="shortgpt", calibration=_blocks(8, 12, 1), num_remove=1)
    with pytest.raises(ConfigError, match=r"recovery.min_lr=0.5 must lie in \[0, recovery.lr=0.0002\]"):
        recover(student, teacher, plan, "distill", train=_blocks(8, 12, 2), val=_blocks(4, 12, 3), min_lr=0.5)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    model, summary = recover(student, teacher, plan, "distill", train=_blocks(8, 12, 2), val=_blocks(4, 12, 3), progress=False,
                             max_steps=2, batch_size=4, overrides=["recovery.data.seq_len=12", "recovery.local.ignore_first=1"])
    assert summary["layers_trained"] and summary["phases"][0]["steps"] == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
