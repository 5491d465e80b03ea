"""Tests for loading karpathy/llama2.c checkpoints as HF Llama models (stories260K, CPU, fast)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerfold.models.llama2c import (
    _llama2c_encode,
    _read_tokenizer_bin,
    load_llama2c,
    load_llama2c_model,
    read_llama2c_header,
)

MODELS_DIR = Path(
    os.environ.get("LAYERFOLD_MODELS_DIR", Path(__file__).resolve().parents[3] / "shared" / "models")
)
CKPT = MODELS_DIR / "stories260K" / "stories260K.bin"
TOK = MODELS_DIR / "stories260K" / "tok512.bin"

pytestmark = pytest.mark.skipif(
    not (CKPT.is_file() and TOK.is_file()),
    reason=f"stories260K files not found ({CKPT}, {TOK}); set LAYERFOLD_MODELS_DIR",
)

# Known greedy continuation of stories260K from BOS (llama2.c README, temperature 0).
EXPECTED_STORY = "Once upon a time, there was a little girl named Lily"

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Hello world!\nNew line 123",
    "café crème brûlée",
    "  leading spaces and  double  spaces ",
    "emoji 🙂 and 日本語 text",
    "Lily's mom said, \"Let's go to the park.\"",
    "x",
]


@pytest.fixture(scope="module")
def loaded():
    return load_llama2c(CKPT, TOK)


def _reference_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """Literal numpy port of llama2.c run.c ``forward`` (own parser, interleaved RoPE)."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", path.read_bytes()[:28])
    shared, vocab = vocab > 0, abs(vocab)
    hs, kv_dim = dim // n_heads, dim // n_heads * n_kv
    flat = np.fromfile(path, dtype="<f4", offset=28).astype(np.float64)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = flat[pos : pos + n].reshape(shape)
        pos += n
        return out

    emb = take(vocab, dim)
    rms_att, wq, wk = take(n_layers, dim), take(n_layers, dim, dim), take(n_layers, kv_dim, dim)
    wv, wo, rms_ffn = take(n_layers, kv_dim, dim), take(n_layers, dim, dim), take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len * hs)  # legacy freq_cis_real + freq_cis_imag
    wcls = emb if shared else take(vocab, dim)

    def rmsnorm(x, w):
        return w * x / np.sqrt(np.mean(x * x) + 1e-5)

    def rope(v, p):  # rotate adjacent pairs (i, i+1), frequency depends on i % head_size
        v = v.copy()
        for i in range(0, v.size, 2):
            f = 1.0 / 10000.0 ** ((i % hs) / hs)
            c, s = np.cos(p * f), np.sin(p * f)
            v[i], v[i + 1] = v[i] * c - v[i + 1] * s, v[i] * s + v[i + 1] * c
        return v

    kcache = np.zeros((n_layers, len(tokens), kv_dim))
    vcache = np.zeros((n_layers, len(tokens), kv_dim))
    logits = []
    for p, tok in enumerate(tokens):
        x = emb[tok].copy()
        for layer in range(n_layers):
            xb = rmsnorm(x, rms_att[layer])
            q = rope(wq[layer] @ xb, p)
            kcache[layer, p] = rope(wk[layer] @ xb, p)
            vcache[layer, p] = wv[layer] @ xb
            att_out = np.zeros(dim)
            for h in range(n_heads):
                kvh = h // (n_heads // n_kv)
                k = kcache[layer, : p + 1, kvh * hs : (kvh + 1) * hs]
                v = vcache[layer, : p + 1, kvh * hs : (kvh + 1) * hs]
                a = k @ q[h * hs : (h + 1) * hs] / np.sqrt(hs)
                a = np.exp(a - a.max())
                att_out[h * hs : (h + 1) * hs] = (a / a.sum()) @ v
            x = x + wo[layer] @ att_out
            xb = rmsnorm(x, rms_ffn[layer])
            g = w1[layer] @ xb
            x = x + w2[layer] @ ((g / (1.0 + np.exp(-g))) * (w3[layer] @ xb))
        logits.append(wcls @ rmsnorm(x, rms_final))
    return np.stack(logits)


def test_header_and_config(loaded):
    model, tok = loaded
    h = read_llama2c_header(CKPT)
    assert (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.max_seq_len) == (
        64, 172, 5, 8, 4, 512, 512,
    )
    assert h.shared_classifier
    cfg = model.config
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.max_position_embeddings) == (1, 2, 512)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tok) == 512 and tok.bos_token_id == 1 and tok.eos_token_id == 2


def test_logits_match_llama2c_reference(loaded):
    """HF forward == run.c forward: checks layout and the q/k RoPE permutation."""
    model, tok = loaded
    ids = tok("Once upon a time, there was")["input_ids"]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].double().numpy()
    ref = _reference_logits(CKPT, ids)
    np.testing.assert_allclose(hf, ref, atol=1e-4, rtol=1e-4)


def test_greedy_generation_from_bos(loaded):
    model, tok = loaded
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=60, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith(EXPECTED_STORY), text


@pytest.mark.parametrize("text", TEXTS + [""])
def test_tokenizer_matches_llama2c_encoder(loaded, text):
    _, tok = loaded
    pieces, scores, _ = _read_tokenizer_bin(TOK)
    expected = _llama2c_encode(text, pieces, scores)
    assert tok(text, add_special_tokens=False)["input_ids"] == expected
    assert tok(text)["input_ids"] == [1] + expected  # BOS added automatically
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_reference_encoder_uses_byte_fallback():
    pieces, scores, _ = _read_tokenizer_bin(TOK)
    ids = _llama2c_encode("\n", pieces, scores)
    assert ids[-1] == ord("\n") + 3  # <0x0A>


def test_batched_padding(loaded):
    model, tok = loaded
    batch = tok(["Once upon a time", "Hi"], return_tensors="pt", padding=True)
    assert batch["input_ids"][1, 0].item() == tok.pad_token_id  # left padding
    with torch.no_grad():
        padded = model(**batch).logits[1, -1]
        alone = model(torch.tensor([tok("Hi")["input_ids"]])).logits[0, -1]
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)


def test_save_pretrained_round_trip(loaded, tmp_path):
    model, tok = loaded
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert type(model2).__name__ == "LlamaForCausalLM"
    assert not (tmp_path / "configuration_llama2c.py").exists()
    for text in TEXTS:
        assert tok2(text)["input_ids"] == tok(text)["input_ids"]
        assert tok2.decode(tok2(text)["input_ids"], skip_special_tokens=True) == text
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert (tok2.pad_token, tok2.padding_side) == ("<unk>", "left")


def test_dtype_argument():
    model = load_llama2c_model(CKPT, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_untied_classifier(tmp_path):
    """Negative vocab_size in the header: wcls follows the legacy RoPE tables."""
    raw = CKPT.read_bytes()
    header = list(struct.unpack("<7i", raw[:28]))
    vocab, dim = header[5], header[0]
    header[5] = -vocab
    wcls = np.random.default_rng(0).standard_normal((vocab, dim)).astype("<f4")
    path = tmp_path / "untied.bin"
    path.write_bytes(struct.pack("<7i", *header) + raw[28:] + wcls.tobytes())
    model = load_llama2c_model(path)
    assert not model.config.tie_word_embeddings
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), wcls)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw[:-100], "truncated"),
        (lambda raw: raw + b"\0" * 8, "trailing data"),
        (lambda raw: raw[:10], "too short"),
        (lambda raw: struct.pack("<Ii", 0x616B3432, 1) + raw[8:], "version-0"),
        (lambda raw: struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + raw[28:], "not divisible"),
    ],
    ids=["truncated", "trailing", "tiny", "versioned", "bad-header"],
)
def test_corrupt_checkpoint_raises(tmp_path, mutate, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(mutate(CKPT.read_bytes()))
    with pytest.raises(ValueError, match=message) as exc:
        load_llama2c(path, TOK)
    assert "export.py" in str(exc.value)  # tells the user how to fix it


def test_tokenizer_vocab_mismatch_raises(tmp_path):
    raw = CKPT.read_bytes()
    header = list(struct.unpack("<7i", raw[:28]))
    header[5] = 600  # vocab larger than tok512
    path = tmp_path / "bigvocab.bin"
    path.write_bytes(struct.pack("<7i", *header) + raw[28:])
    with pytest.raises(ValueError, match="vocab_size=600"):
        load_llama2c(path, TOK)
