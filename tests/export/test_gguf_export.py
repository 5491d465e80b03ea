"""GGUF export read back by transformers' GGUF reader: stories260K and tiny Llamas, every type, tokenizer, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import tiny_model
from layerfold.export import ExportError, check_export, export_gguf
from layerfold.export.verify import compare_logits, load_gguf
from layerfold.export.writer import TYPES, to_interleaved_rotary
from layerfold.models import load_checkpoint, save_checkpoint
from layerfold.models.replacement import SIDE_FILE

TEXT = ["Once upon a time, there was a little girl named Lily.", "She liked to play outside in the sun!", "ünïcode ☃ 123"]


def ids_of(tokenizer) -> torch.Tensor:
    return tokenizer(TEXT[0] + " " + TEXT[1], return_tensors="pt").input_ids


def gguf_state(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_gguf(path)
    return {k: v.detach() for k, v in model.state_dict().items()}


def through(state: dict[str, torch.Tensor], convert) -> dict[str, torch.Tensor]:
    """``state`` with every 2-D tensor passed through ``convert`` (what the file stores, read back as float32)."""
    return {k: convert(v) if v.ndim == 2 else v for k, v in state.items()}


def with_state(model, state: dict[str, torch.Tensor]):
    clone = type(model)(model.config).eval()
    clone.load_state_dict(state, strict=False)
    clone.tie_weights()
    return clone


def test_f32_round_trip_is_exact(stories, tmp_path):
    """f32: transformers reads back the checkpoint's tensors bit for bit, so its logits are identical."""
    checkpoint, model, tokenizer = stories
    report = export_gguf(checkpoint, tmp_path / "m.gguf", "f32", progress=False)
    assert report["tensor_types"] == {"F32": 47} and report["relative_rms_error"] == {"F32": 0.0}
    loaded, _ = load_gguf(tmp_path / "m.gguf")
    assert loaded.config.num_hidden_layers == 5 and loaded.config.num_key_value_heads == 4 and loaded.config.tie_word_embeddings
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert compare_logits(model, loaded, ids_of(tokenizer))["identical_logits"]


@pytest.mark.parametrize("quantization, dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_logits_equal_the_rounded_checkpoint(stories, tmp_path, quantization, dtype):
    """f16/bf16: every 2-D tensor comes back as the checkpoint's rounded to that dtype (bit for bit), the norms
    exactly; the logits are identical to the checkpoint's with its weights rounded the same way, and differ
    from the float32 checkpoint's only by that rounding (stated bound: max |logit diff| < 0.1 on stories260K)."""
    checkpoint, model, tokenizer = stories
    export_gguf(checkpoint, tmp_path / "m.gguf", quantization, progress=False)
    loaded, _ = load_gguf(tmp_path / "m.gguf")
    rounded = through(model.state_dict(), lambda t: t.to(dtype).float())
    for key, tensor in rounded.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    ids = ids_of(tokenizer)
    assert compare_logits(with_state(model, rounded), loaded, ids)["identical_logits"]
    assert compare_logits(model, loaded, ids)["max_abs_logit_diff"] < 0.1


@pytest.mark.parametrize("quantization", ["q8_0", "q4_0", "q4_1"])
def test_quantised_types_read_back_as_written(stories, tmp_path, quantization):
    """Quantised: each tensor comes back as gguf's own dequantise(quantise(tensor)) (the rotary permutation undone
    exactly), so the logits equal the checkpoint's with its weights re-quantised; the re-quantisation error is
    what the report measures, within the stated bounds (relative RMS: Q8_0 < 1 %, Q4_0/Q4_1 < 12 %)."""
    checkpoint, model, tokenizer = stories
    report = export_gguf(checkpoint, tmp_path / "m.gguf", quantization, progress=False)
    qtype = TYPES[quantization]
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    written = {t.name: T(t.tensor_type) for t in reader.tensors}
    assert written["token_embd.weight"] == T.Q8_0  # the vocabulary projection (tied) stays at 8 bits
    assert written["blk.0.attn_q.weight"] == qtype and written["blk.0.attn_norm.weight"] == T.F32
    assert written["blk.0.ffn_down.weight"] == T.F16  # rows of 172: not a multiple of 32, F16 as llama.cpp's converter does
    assert report["fallbacks"]["blk.0.ffn_down.weight"].startswith("F16")

    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    expected = {}
    for key, tensor in model.state_dict().items():
        if tensor.ndim < 2:
            expected[key] = tensor
            continue
        name = "token_embd.weight" if "embed_tokens" in key or key == "lm_head.weight" else None
        layer_type = written.get(name) if name else None
        if layer_type is None:
            part = key.split(".")
            role = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
                    "up_proj": "ffn_up", "down_proj": "ffn_down"}[part[-2]]
            layer_type = written[f"blk.{part[2]}.{role}.weight"]
        array = tensor.numpy()
        n = heads if key.endswith("q_proj.weight") else kv if key.endswith("k_proj.weight") else None
        if n:
            array = to_interleaved_rotary(array, n)
        back = array.astype(np.float16).astype(np.float32) if layer_type == T.F16 else quants.dequantize(quants.quantize(array, layer_type), layer_type)
        if n:  # undo the permutation: the inverse of interleaving is the same reshape read the other way
            back = back.reshape(n, back.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
        expected[key] = torch.from_numpy(np.ascontiguousarray(back))
    loaded, _ = load_gguf(tmp_path / "m.gguf")
    for key, tensor in expected.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert compare_logits(with_state(model, expected), loaded, ids_of(tokenizer))["identical_logits"]
    bound = 0.01 if quantization == "q8_0" else 0.12
    assert 0 < report["relative_rms_error"][qtype.name] < bound
    assert report["bytes"] == (tmp_path / "m.gguf").stat().st_size


def test_tokenizer_round_trip(stories, tmp_path):
    """The converted tokenizer encodes like the checkpoint's (BOS included) and keeps its special ids; text that
    starts with a space is the known exception of transformers' GGUF reader (Metaspace, not Prepend)."""
    checkpoint, _, tokenizer = stories
    export_gguf(checkpoint, tmp_path / "m.gguf", "f16", progress=False)
    _, read = load_gguf(tmp_path / "m.gguf", tokenizer=True)
    for text in [*TEXT, "", "a\nb\n\n c"]:
        assert read(text).input_ids == tokenizer(text).input_ids, text
    assert (read.bos_token_id, read.eos_token_id, read.unk_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert read.decode(read(TEXT[0]).input_ids, skip_special_tokens=True) == TEXT[0]
    fields = GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.tokens"].contents() == [tokenizer.convert_ids_to_tokens(i) for i in range(512)]


def _tiny_llama_checkpoint(tmp_path: Path, stories_tokenizer, **config) -> tuple[Path, LlamaForCausalLM]:
    """A random Llama on the stories tokenizer (vocab 512): GQA, untied head, an explicit head_dim."""
    torch.manual_seed(0)
    settings = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                    head_dim=32, rms_norm_eps=1e-6, rope_theta=500000.0)
    settings.update(config)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():  # non-trivial norms (and biases), so a misplaced one shows
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.randn_like(param) * 0.5 + (1.0 if "norm" in name else 0.0))
    path = tmp_path / "tiny"
    save_checkpoint(model, stories_tokenizer, path, dtype=torch.float32)
    return path, model


def test_untied_gqa_and_head_dim(stories, tmp_path):
    """Metadata a reader needs: untied output.weight, key-value heads, a head dimension other than hidden/heads
    (key_length), rope base and norm epsilon: logits identical in f32."""
    _, _, tokenizer = stories
    path, model = _tiny_llama_checkpoint(tmp_path, tokenizer)
    export_gguf(path, tmp_path / "t.gguf", "f32", progress=False)
    fields = GGUFReader(str(tmp_path / "t.gguf")).fields
    values = {k: fields[k].contents() for k in fields if k.startswith("llama.")}
    assert values["llama.block_count"] == 3 and values["llama.attention.head_count_kv"] == 2 and values["llama.attention.key_length"] == 32
    assert values["llama.rope.freq_base"] == 500000.0 and values["llama.rope.dimension_count"] == 32
    assert any(t.name == "output.weight" for t in GGUFReader(str(tmp_path / "t.gguf")).tensors)
    loaded, _ = load_gguf(tmp_path / "t.gguf")
    assert not loaded.config.tie_word_embeddings and loaded.config.head_dim == 32
    assert compare_logits(model, loaded, ids_of(tokenizer))["identical_logits"]


def test_attention_biases_are_permuted_like_their_weights(stories, tmp_path):
    """Biases go where llama.cpp reads them (``blk.N.attn_q.bias``), the query and key ones permuted with their rows.
    (transformers' GGUF reader builds a llama without biases, so this is checked on the file.)"""
    _, _, tokenizer = stories
    path, model = _tiny_llama_checkpoint(tmp_path, tokenizer, attention_bias=True)
    export_gguf(path, tmp_path / "t.gguf", "f32", progress=False)
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(str(tmp_path / "t.gguf")).tensors}
    attn = model.model.layers[2].self_attn
    assert np.array_equal(tensors["blk.2.attn_q.bias"], to_interleaved_rotary(attn.q_proj.bias.detach().numpy(), 4))
    assert np.array_equal(tensors["blk.2.attn_k.bias"], to_interleaved_rotary(attn.k_proj.bias.detach().numpy(), 2))
    assert np.array_equal(tensors["blk.2.attn_v.bias"], attn.v_proj.bias.detach().numpy())
    assert np.array_equal(tensors["blk.2.attn_output.bias"], attn.o_proj.bias.detach().numpy())
    assert not np.array_equal(tensors["blk.2.attn_q.bias"], attn.q_proj.bias.detach().numpy())  # the permutation moved something


def test_llama3_rope_scaling_as_rope_freqs(stories, tmp_path):
    """Llama-3 rope scaling is written as llama.cpp reads it: a rope_freqs tensor whose entries divide the plain
    frequencies into the scaled ones transformers computes."""
    _, _, tokenizer = stories
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    path, model = _tiny_llama_checkpoint(tmp_path, tokenizer, rope_parameters=rope, max_position_embeddings=256)
    export_gguf(path, tmp_path / "t.gguf", "f32", progress=False)
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(str(tmp_path / "t.gguf")).tensors}
    plain = 1.0 / (500000.0 ** (np.arange(0, 32, 2) / 32))
    scaled = model.model.rotary_emb.inv_freq.double().numpy()
    assert np.allclose(plain / tensors["rope_freqs.weight"], scaled, rtol=1e-5)
    assert tensors["rope_freqs.weight"].min() == 1.0 and tensors["rope_freqs.weight"].max() == 8.0


def test_source_types_and_tokenizer_come_back(stories, tmp_path):
    """GGUF in, GGUF out: a checkpoint made from a GGUF (as the base stage does) exported with quantization=source
    gets each tensor's type from the source, and its tokenizer keys copied; dense, the file holds the source's
    tensors byte for byte (Q8_0 of dequantised Q8_0 re-quantises to the same blocks here)."""
    from omegaconf import OmegaConf

    from layerfold.models import identity, load_source
    from layerfold.models.sources import IDENTITY_ATTR

    checkpoint, _, _ = stories
    source = tmp_path / "source.gguf"
    export_gguf(checkpoint, source, "q8_0", progress=False)
    cfg = OmegaConf.create({"source": "gguf", "path": str(source), "name": "stories-q8_0", "package": None, "file": None})
    model, tokenizer = load_source(cfg)
    setattr(model.config, IDENTITY_ATTR, {"name": cfg.name, **identity(cfg, "float32")})
    save_checkpoint(model, tokenizer, tmp_path / "base", dtype=torch.float32)
    report = export_gguf(tmp_path / "base", tmp_path / "back.gguf", "source", source, progress=False)
    assert report["tokenizer"] == "copied from source.gguf" and report["source_gguf"]["file"] == "source.gguf"
    original, back = GGUFReader(str(source)), GGUFReader(str(tmp_path / "back.gguf"))
    theirs = {t.name: t for t in original.tensors}
    assert sorted(theirs) == sorted(t.name for t in back.tensors)
    for tensor in back.tensors:
        assert tensor.tensor_type == theirs[tensor.name].tensor_type, tensor.name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(theirs[tensor.name].data)), tensor.name
    for key, field in original.fields.items():
        if key.startswith("tokenizer."):
            assert back.fields[key].contents() == field.contents(), key
    assert back.fields["general.name"].contents() == "stories-q8_0 5 layers"


def test_source_gguf_must_be_the_ancestor(stories, tmp_path):
    """A checkpoint that records its source's sha256 refuses another file as its source."""
    from omegaconf import OmegaConf

    from layerfold.models import identity, load_source
    from layerfold.models.sources import IDENTITY_ATTR

    checkpoint, _, _ = stories
    export_gguf(checkpoint, tmp_path / "a.gguf", "q8_0", progress=False)
    export_gguf(checkpoint, tmp_path / "b.gguf", "q4_0", progress=False)
    cfg = OmegaConf.create({"source": "gguf", "path": str(tmp_path / "a.gguf"), "name": "a", "package": None, "file": None})
    model, tokenizer = load_source(cfg)
    setattr(model.config, IDENTITY_ATTR, {"name": "a", **identity(cfg, "float32")})
    save_checkpoint(model, tokenizer, tmp_path / "base", dtype=torch.float32)
    with pytest.raises(ExportError, match="not the file this checkpoint descends from"):
        check_export(tmp_path / "base", tmp_path / "x.gguf", "source", tmp_path / "b.gguf")


# Refusals: before anything is written ------------------------------------------------------------------------


@pytest.mark.parametrize("quantization, match", [("q5_k", "must be one of source, f32, f16, bf16, q8_0, q4_0, q4_1"),
                                                 ("source", "does not descend from a GGUF")])
def test_bad_quantisation_is_refused(stories, tmp_path, quantization, match):
    checkpoint, _, _ = stories
    with pytest.raises(ExportError, match=match) as err:
        export_gguf(checkpoint, tmp_path / "m.gguf", quantization, progress=False)
    assert "export.quantization" in str(err.value) and "q8_0" in str(err.value)  # key, allowed, fix
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_is_refused(stories, tmp_path):
    checkpoint, _, _ = stories
    with pytest.raises(ExportError, match="does not exist. Create it first"):
        export_gguf(checkpoint, tmp_path / "absent" / "m.gguf", "f16", progress=False)
    assert not (tmp_path / "absent").exists()


def test_unknown_architecture_is_refused(stories, tmp_path):
    _, _, tokenizer = stories
    save_checkpoint(tiny_model("qwen2"), tokenizer, tmp_path / "qwen")
    with pytest.raises(ExportError, match="Cannot export architecture 'qwen2' .*knows llama"):
        export_gguf(tmp_path / "qwen", tmp_path / "m.gguf", "f16", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_non_stock_checkpoint_is_refused_with_the_reason(stories, tmp_path):
    checkpoint, _, _ = stories
    custom = tmp_path / "custom"
    shutil.copytree(checkpoint, custom)
    (custom / SIDE_FILE).write_bytes(b"")
    with pytest.raises(ExportError, match="not a stock checkpoint.*replacement layers no stock layer class"):
        export_gguf(custom, tmp_path / "m.gguf", "f16", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_rope_and_activation_are_refused(stories, tmp_path):
    _, _, tokenizer = stories
    path, _ = _tiny_llama_checkpoint(tmp_path, tokenizer, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ExportError, match="rope_type='yarn'"):
        check_export(path, tmp_path / "m.gguf", "f16")
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_act="gelu", rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="hidden_act='gelu'"):
        check_export(path, tmp_path / "m.gguf", "f16")


def test_killed_write_leaves_no_file(stories, tmp_path, monkeypatch):
    """The file is written to a temporary sibling and renamed on success."""
    from gguf import GGUFWriter

    checkpoint, _, _ = stories

    def fail(self, *args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(RuntimeError, match="killed"):
        export_gguf(checkpoint, tmp_path / "m.gguf", "f16", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pipeline_load_checkpoint_and_gguf_agree_after_pruning(stories, tmp_path):
    """A pruned stories260K (layers removed through layerfold's surgery, as ShortGPT does) exports with the new
    block count and per-layer tensors renumbered; f32 logits identical."""
    from layerfold.surgery import remove_layers

    checkpoint, _, tokenizer = stories
    model, _ = load_checkpoint(checkpoint)
    remove_layers(model, [1, 3])
    save_checkpoint(model, tokenizer, tmp_path / "pruned", dtype=torch.float32)
    export_gguf(tmp_path / "pruned", tmp_path / "p.gguf", "f32", progress=False)
    reader = GGUFReader(str(tmp_path / "p.gguf"))
    assert reader.fields["llama.block_count"].contents() == 3
    assert sorted({int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")}) == [0, 1, 2]
    loaded, _ = load_gguf(tmp_path / "p.gguf")
    assert compare_logits(model, loaded, ids_of(tokenizer))["identical_logits"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert plain.config.num_hidden_layers == 3
    assert AutoTokenizer.from_pretrained(tmp_path / "pruned")(TEXT[0]).input_ids == tokenizer(TEXT[0]).input_ids
