"""Per-layer weight loaders: only the requested layer is read, the seeded loader is deterministic per (seed, layer)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import models_dir, tiny_model
from execution_fixtures import _single_thread  # noqa: F401  (fixture)
from transformers import AutoModelForCausalLM, LlamaConfig

import layerfold.execution.loaders as loaders
from layerfold.execution import LayerMajorRunner, SafetensorsLayerLoader, SeededLayerLoader, TokenNLL, token_nll
from layerfold.execution.loaders import LayerIndexError
from layerfold.execution.loss import token_nll as resident_token_nll
from layerfold.models import ModelSourceError, save_checkpoint
from layerfold.models.llama2c import load_llama2c_tokenizer


REAL_SAFE_OPEN = loaders.safe_open


class CountingOpen:
    """Stands in for ``safetensors.safe_open``: records which shards are opened and which tensors read."""

    def __init__(self) -> None:
        self.shards: list[str] = []
        self.tensors: list[str] = []

    def __call__(self, path, framework, **kwargs):
        self.shards.append(path.rsplit("/", 1)[-1])
        counter, handle = self, REAL_SAFE_OPEN(path, framework, **kwargs)

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_tensor(self, key):
                counter.tensors.append(key)
                return handle.get_tensor(key)

        return Handle()


@pytest.fixture
def sharded(tmp_path):
    """A tiny Llama saved in several shards (at most ~24 kB each), and the model."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="24KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    return tmp_path, model


def test_safetensors_loader_reads_only_the_requested_layer(sharded, monkeypatch):
    path, model = sharded
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 3
    loader = SafetensorsLayerLoader(path)
    counting = CountingOpen()
    monkeypatch.setattr(loaders, "safe_open", counting)
    state = loader.load_layer(2, "cpu", torch.float32)

    wanted = sorted(k for k in weight_map if k.startswith("model.layers.2."))
    assert sorted(counting.tensors) == wanted
    assert sorted(counting.shards) == sorted({weight_map[k] for k in wanted})
    reference = model.model.layers[2].state_dict()
    assert state.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0)


def test_safetensors_loader_outer_and_single_file(tmp_path):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path)  # one model.safetensors, no index
    loader = SafetensorsLayerLoader(tmp_path)
    assert loader.num_layers == 4 and loader.config.model_type == "qwen3"
    outer = loader.load_outer("cpu", torch.bfloat16)
    assert set(outer) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert all(t.dtype == torch.bfloat16 for t in outer.values())
    assert "self_attn.q_norm.weight" in loader.load_layer(3, "cpu", torch.float32)


def test_safetensors_loader_refuses_an_incomplete_checkpoint(sharded):
    path, _ = sharded
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.startswith("model.layers.3.")}
    index.write_text(json.dumps(data))
    with pytest.raises(ModelSourceError, match=r"no tensors for layers \[3\]"):
        SafetensorsLayerLoader(path)


def test_safetensors_loader_bad_index_and_missing_dir(sharded, tmp_path):
    path, _ = sharded
    with pytest.raises(LayerIndexError, match="valid: 0..3"):
        SafetensorsLayerLoader(path).load_layer(4, "cpu", torch.float32)
    with pytest.raises(ModelSourceError, match="no config.json"):
        SafetensorsLayerLoader(tmp_path / "nothing")


def test_tied_embeddings_run_from_a_checkpoint(tmp_path):
    """stories260K-style tied head: the checkpoint has no lm_head tensor; the skeleton ties it to the embedding."""
    tok = models_dir() / "stories260K" / "tok512.bin"
    if not tok.is_file():
        pytest.skip(f"{tok} not found (set LAYERFOLD_MODELS_DIR)")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    save_checkpoint(model, load_llama2c_tokenizer(tok), tmp_path / "tied", dtype=torch.float32)
    runner = LayerMajorRunner(SafetensorsLayerLoader(tmp_path / "tied"), "cpu", torch.float32)
    assert runner.lm_head().weight is runner.model.get_input_embeddings().weight
    blocks = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    nll, _, _ = token_nll(tmp_path / "tied", blocks, {"mode": "sequential"})
    assert nll == pytest.approx(resident_token_nll(model, blocks)[0], rel=1e-5)


def tiny_config(layers: int = 4) -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, initializer_range=0.02)


def test_seeded_loader_is_deterministic_per_seed_and_layer():
    loader = SeededLayerLoader(tiny_config(), seed=3, dtype=torch.float32)
    second = loader.load_layer(2, "cpu", torch.float32)
    loader.load_layer(0, "cpu", torch.float32)  # order does not matter
    again = SeededLayerLoader(tiny_config(), seed=3, dtype=torch.float32).load_layer(2, "cpu", torch.float32)
    for key in second:
        torch.testing.assert_close(second[key], again[key], rtol=0, atol=0)
    other_layer = loader.load_layer(1, "cpu", torch.float32)
    other_seed = SeededLayerLoader(tiny_config(), seed=4, dtype=torch.float32).load_layer(2, "cpu", torch.float32)
    q = "self_attn.q_proj.weight"
    assert not torch.equal(second[q], other_layer[q]) and not torch.equal(second[q], other_seed[q])
    # HF-style initialisation: normal(0, initializer_range) linears, ones for norms.
    assert second[q].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(second["input_layernorm.weight"], torch.ones(64))
    assert set(loader.load_outer("cpu", torch.float32)) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def test_seeded_loader_generates_in_its_dtype_then_casts():
    stored = SeededLayerLoader(tiny_config(), seed=0, dtype=torch.bfloat16)
    as_fp32 = stored.load_layer(1, "cpu", torch.float32)["mlp.up_proj.weight"]
    as_bf16 = stored.load_layer(1, "cpu", torch.bfloat16)["mlp.up_proj.weight"]
    assert as_fp32.dtype == torch.float32 and torch.equal(as_fp32, as_bf16.float())


def test_seeded_stack_stays_finite_through_many_layers():
    """80 seeded layers (the depth of Llama-3-70B): every boundary and the NLL finite."""
    layers = 80
    loader = SeededLayerLoader(tiny_config(layers), seed=0, dtype=torch.float32)
    runner = LayerMajorRunner(loader, "cpu", torch.float32, activations="device", batch_size=2)
    blocks = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    acts = runner.embed(blocks)
    head = TokenNLL(runner.final_norm(), runner.lm_head(), acts, layers)
    finite, largest = [], []

    def check(boundary: int, batch: int, hidden: torch.Tensor) -> None:
        finite.append(bool(torch.isfinite(hidden).all()))
        largest.append(hidden.abs().max().item())
        head(boundary, batch, hidden)

    runner.run_layers(acts, on_boundary=check)
    assert len(finite) == layers + 1 and all(finite)
    assert max(largest) < 1e3  # far from overflowing bf16 or fp16, not only "not inf"
    assert torch.isfinite(torch.tensor(head.nll)) and head.count == 2 * 15
