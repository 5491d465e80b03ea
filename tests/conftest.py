"""Shared fixtures: tiny random models of every supported family and the local data/model folders."""

from __future__ import annotations

import functools

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def data_dir() -> Path:
    return Path(os.environ.get("LAYERFOLD_DATA_DIR", SHARED / "datasets"))


def models_dir() -> Path:
    return Path(os.environ.get("LAYERFOLD_MODELS_DIR", SHARED / "models"))


@pytest.fixture
def shared_data() -> Path:
    path = data_dir()
    if not path.is_dir():
        pytest.skip(f"local dataset folder {path} not present (set LAYERFOLD_DATA_DIR)")
    return path


def _common(**extra):
    return dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, **extra)


TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_common(intermediate_size=64, num_key_value_heads=2)),
    "mistral": lambda: MistralConfig(**_common(intermediate_size=64, num_key_value_heads=2, sliding_window=None)),
    "qwen2": lambda: Qwen2Config(**_common(intermediate_size=64, num_key_value_heads=2)),
    "qwen3": lambda: Qwen3Config(**_common(intermediate_size=64, num_key_value_heads=2, head_dim=8)),
    "opt": lambda: OPTConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64,
        word_embed_proj_dim=32, max_position_embeddings=64,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(**_common(intermediate_size=64, max_position_embeddings=64)),
}


class FakeClock:
    """A clock for timing tests: it moves only when the code under test says time passed (``clock.now += s``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS[family]()).eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def family(request) -> str:
    return request.param


def make_clone(dest: Path) -> tuple[Path, dict]:
    """A fresh git clone of the working tree (tracked and untracked-not-ignored files) at ``dest``,
    committed, with the environment the pipeline needs there (data/models folders, this venv's tools)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    env = {
        **os.environ,
        "LAYERFOLD_DATA_DIR": str(data_dir()),
        "LAYERFOLD_MODELS_DIR": str(models_dir()),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    # dvc exp run commits experiment refs itself and reads the identity from git config, not env.
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "layerfold-test"],
                ["git", "config", "user.email", "test@layerfold.invalid"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, check=True)
    return dest, env


@functools.lru_cache(maxsize=None)
def load_benchmark(name: str):
    """A script of ``benchmarks/`` as a module, loaded once (the scripts import ``common`` from their own folder)."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """Tiny models need no intra-op threads, and two spin-waiting ones crawl on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_checkpoint(resident: Path, ours: Path) -> tuple[dict[str, Path], dict[str, torch.Tensor], dict]:
    """Two compressed checkpoints (resident path, layer-by-layer path) hold the same files, identical bf16
    tensors and the same ``config.json``, which names the stored dtype (bfloat16) on both.
    Returns our ``{file name: path}``, tensors and config."""
    import json

    from safetensors.torch import load_file

    resident_files, our_files = ({p.name: p for p in sorted(folder.iterdir())} for folder in (resident, ours))
    assert sorted(our_files) == sorted(resident_files)
    theirs, mine = load_file(resident_files["model.safetensors"]), load_file(our_files["model.safetensors"])
    assert sorted(mine) == sorted(theirs)
    for key, tensor in theirs.items():
        assert mine[key].dtype == tensor.dtype == torch.bfloat16 and torch.equal(mine[key], tensor), key
    config, resident_config = (json.loads(files["config.json"].read_text()) for files in (our_files, resident_files))
    assert config == resident_config and config["dtype"] == "bfloat16"
    return our_files, mine, config


@pytest.fixture(scope="session")
def stories(tmp_path_factory):
    """``(checkpoint dir, model, tokenizer)``: stories260K (5 layers, tied embeddings) saved in fp32."""
    folder = models_dir() / "stories260K"
    if not (folder / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not found in {folder} (set LAYERFOLD_MODELS_DIR)")
    from layerfold.models import save_checkpoint
    from layerfold.models.llama2c import load_llama2c

    model, tokenizer = load_llama2c(folder / "stories260K.bin", folder / "tok512.bin")
    path = tmp_path_factory.mktemp("stories") / "checkpoint"
    save_checkpoint(model, tokenizer, path, dtype=torch.float32)
    return path, model.eval(), tokenizer

