"""Bad models, files and data fail before anything is written, with the file or setting and the fix."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from conftest import REPO, TINY_CONFIGS, models_dir, tiny_model
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, T5Config

from layerfold.capture.stats import NonFiniteActivationError, capture_statistics
from layerfold.data.calibration import build_calibration
from layerfold.data.fingerprint import fingerprint, required_files
from layerfold.data.text import LOCAL_FILES
from layerfold.io import DamagedFileError
from layerfold.models import ModelSourceError, UnsupportedArchitectureError, load_checkpoint, probe
from layerfold.models.llama2c import load_llama2c_tokenizer
from layerfold.models.resources import InsufficientMemoryError, guard
from layerfold.models.sources import save_checkpoint

STORIES = models_dir() / "stories260K"

pytestmark = pytest.mark.hostile(input="model", stage="base", expect=("message", "no-partial"))


def model_cfg(**values) -> OmegaConf:
    base = {"name": "t", "source": "local", "id": None, "revision": None, "path": None, "package": None, "file": None, "tokenizer": None}
    return OmegaConf.create({**base, **values})


@pytest.fixture
def stories_tokenizer():
    if not STORIES.is_dir():
        pytest.skip("stories260K not present (set LAYERFOLD_MODELS_DIR)")
    return load_llama2c_tokenizer(STORIES / "tok512.bin")


@pytest.fixture
def tiny_checkpoint(tmp_path, stories_tokenizer):
    """A tiny Llama saved as a plain checkpoint, with a tokenizer that fits its 512-row embedding."""
    config = TINY_CONFIGS["llama"]()
    config.vocab_size = 512
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    save_checkpoint(model, stories_tokenizer, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def run_base_stage(tmp_path, monkeypatch, model_dir) -> None:
    """The `base` stage in a scratch working directory, on a local model directory."""
    import yaml

    from layerfold.config import compose
    from pipeline.base import main

    params = compose(REPO / "conf", ["model.source=local", f"model.path={model_dir}", "model.name=null", "model.storage_dtype=float32", "method.num_remove=1"])
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(work)
    try:
        main()
    finally:
        assert not (work / "artifacts" / "base").exists(), "a refused model must leave no checkpoint"
        assert not list((work / "artifacts").glob(".*.tmp-*")) if (work / "artifacts").exists() else True


def test_unsupported_architecture_is_refused_before_loading_or_writing(tmp_path, monkeypatch):
    t5 = tmp_path / "t5"  # an encoder-decoder: no causal LM, so no adapter can be found for it
    T5Config(num_layers=2, d_model=32, num_heads=4, vocab_size=64).save_pretrained(t5)  # a config, no weights: never loaded
    with pytest.raises(UnsupportedArchitectureError, match="Architecture 't5' is not supported: it is not a causal LM .*llama"):
        run_base_stage(tmp_path, monkeypatch, t5)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, monkeypatch, stories_tokenizer):
    mismatched = tmp_path / "mismatched"
    save_checkpoint(tiny_model("llama"), stories_tokenizer, mismatched)  # 128-row embedding, 512-token tokenizer
    with pytest.raises(ModelSourceError, match="tokenizer has 512 tokens but the model's embedding only 128 rows"):
        run_base_stage(tmp_path, monkeypatch, mismatched)


@pytest.mark.hostile(input="checkpoint", stage="any")
def test_truncated_safetensors_names_the_file_and_the_fix(tiny_checkpoint):
    weights = tiny_checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError) as err:
        load_checkpoint(tiny_checkpoint)
    message = str(err.value)
    assert str(weights) in message and "truncated" in message
    assert f"dvc checkout --force {tiny_checkpoint}" in message and "dvc repro" in message


@pytest.mark.hostile(input="checkpoint", stage="any")
def test_corrupt_safetensors_header_names_the_file(tiny_checkpoint):
    weights = tiny_checkpoint / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelSourceError, match=r"model\.safetensors is damaged \(unreadable header"):
        load_checkpoint(tiny_checkpoint)


@pytest.mark.hostile(input="environment")
def test_hub_failure_under_offline_mode_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match=r"Offline mode is on \(HF_HUB_OFFLINE=1"):
        probe(model_cfg(source="hub", id="layerfold-tests/not-a-cached-model"))


@pytest.mark.hostile(input="checkpoint", stage="any")
def test_pickled_weights_are_not_executed(tmp_path, tiny_checkpoint):
    """Safe loading: a pickle that would run code when unpickled is rejected, and the code never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    with pytest.raises(Exception):
        load_checkpoint(bad)
    assert not marker.exists()


@pytest.mark.hostile(input="checkpoint", stage="any")
def test_remote_code_is_never_trusted(tmp_path, tiny_checkpoint):
    remote = tmp_path / "remote"
    shutil.copytree(tiny_checkpoint, remote)
    config = (remote / "config.json").read_text()
    (remote / "config.json").write_text(config.replace('"model_type"', '"auto_map": {"AutoModelForCausalLM": "evil.Model"}, "model_type"', 1))
    (remote / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    try:
        load_checkpoint(remote)
    except Exception:
        pass
    assert not (tmp_path / "pwned").exists()


@pytest.mark.hostile(stage="capture")
def test_nan_activations_name_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"output of decoder layer 2 \(layer boundary 3\)"):
        capture_statistics(model, torch.randint(0, 128, (2, 8)), batch_size=2, desc=None)


@pytest.mark.hostile(stage="capture")
def test_inf_embeddings_are_caught_too():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="in the embeddings"):
        capture_statistics(model, torch.full((1, 4), 5), batch_size=1, desc=None)


def data_cfg(root, **calibration) -> OmegaConf:
    cal = {"source": "wikitext2_train", "num_blocks": 2, "seq_len": 8, "chunking": "concat", "add_bos": True, "seed": 0}
    return OmegaConf.create({"local_dir": str(root), "calibration": {**cal, **calibration}, "benchmarks": ["arc_easy"]})


@pytest.mark.hostile(input="data", stage="data")
def test_empty_calibration_text_is_refused(tmp_path, stories_tokenizer):
    path = tmp_path / LOCAL_FILES["wikitext2_train"]
    path.parent.mkdir(parents=True)
    path.write_text("\n\n  \n\n")
    cfg = data_cfg(tmp_path)
    # the reader refuses it, naming the file (tests/failures/test_damaged_inputs.py has the other damaged files)
    with pytest.raises(DamagedFileError, match=f"Data file {LOCAL_FILES['wikitext2_train']} .* is empty; expected UTF-8 text"):
        build_calibration(cfg.calibration, stories_tokenizer, cfg.local_dir)


@pytest.mark.hostile(input="data", stage="data_files", expect=("message", "intact"))
def test_missing_local_dataset_file_is_named_before_the_data_stage(tmp_path):
    cfg = data_cfg(tmp_path)
    for rel in required_files(cfg)[1:]:  # all but the first
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    missing = required_files(cfg)[0]
    with pytest.raises(FileNotFoundError, match=f"Local dataset file {missing} is missing from the data directory {tmp_path}"):
        fingerprint(cfg)


@pytest.mark.hostile(input="data", stage="data_files", expect=("same-hashes",))
def test_data_fingerprint_follows_content_not_location(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    cfg = data_cfg(first)
    for rel in required_files(cfg):
        (first / rel).parent.mkdir(parents=True, exist_ok=True)
        (first / rel).write_text(rel)
    shutil.copytree(first, second)
    assert fingerprint(cfg) == fingerprint(data_cfg(second))  # same files elsewhere: same bytes
    (second / required_files(cfg)[0]).write_text("changed")
    assert fingerprint(cfg) != fingerprint(data_cfg(second))
    assert str(tmp_path) not in str(fingerprint(cfg))


@pytest.mark.hostile(input="environment", stage="capture")
def test_memory_guard_refuses_before_loading_and_suggests_a_batch(tiny_checkpoint):
    with pytest.raises(InsufficientMemoryError, match=r"exceeds cpu .*set capture.batch_size=\d+ or lower"):
        guard(tiny_checkpoint, torch.device("cpu"), torch.float32, batch_size=10**9, seq_len=64, setting="capture.batch_size")
    guard(tiny_checkpoint, torch.device("cpu"), torch.float32, batch_size=2, seq_len=64, setting="capture.batch_size")
