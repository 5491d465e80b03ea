"""Load karpathy/llama2.c checkpoints as plain Hugging Face Llama models.

llama2.c (https://github.com/karpathy/llama2.c) ships tiny Llama-architecture
models (stories260K, stories15M, ...) in its own raw binary format, together
with a tokenizer in its own binary format.  This module converts both into a
stock :class:`~transformers.LlamaForCausalLM` and a
:class:`~transformers.PreTrainedTokenizerFast`, so that the rest of the
pipeline (and ``save_pretrained`` / ``from_pretrained``) can treat them like
any other Hub model, with no custom code.

Only the "legacy" version-0 export is supported (``export.py --version 0``,
the format of the published ``stories*.bin`` files).  Its layout, as read by
``memory_map_weights`` in llama2.c's ``run.c``::

    int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    float32 token_embedding[vocab, dim]
    float32 rms_att[n_layers, dim]
    float32 wq[n_layers, dim, dim]              # nn.Linear layout: [out, in]
    float32 wk[n_layers, kv_dim, dim]
    float32 wv[n_layers, kv_dim, dim]
    float32 wo[n_layers, dim, dim]
    float32 rms_ffn[n_layers, dim]
    float32 w1[n_layers, hidden_dim, dim]       # gate_proj
    float32 w2[n_layers, dim, hidden_dim]       # down_proj
    float32 w3[n_layers, hidden_dim, dim]       # up_proj
    float32 rms_final[dim]
    float32 freq_cis_real[seq_len, head_size/2]  # unused, RoPE is recomputed
    float32 freq_cis_imag[seq_len, head_size/2]
    float32 wcls[vocab, dim]                    # only when vocab_size < 0

A negative ``vocab_size`` in the header means the classifier is *not* tied
to the token embedding and ``wcls`` follows the RoPE tables.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "Llama2cHeader",
    "load_llama2c",
    "load_llama2c_model",
    "llama2c_config",
    "load_llama2c_tokenizer",
    "read_llama2c_header",
]

_HEADER_FORMAT = "<7i"
_HEADER_BYTES = struct.calcsize(_HEADER_FORMAT)
_FLOAT_BYTES = 4
# Versioned (v1/v2) llama2.c exports start with this uint32 magic ("ak42");
# legacy v0 files start directly with ``dim``.
_VERSIONED_MAGIC = 0x616B3432
# SentencePiece's word-boundary marker.  llama2.c's tokenizer export replaced
# it with a plain space; HF's SentencePiece-style tokenizers expect it back.
_SPIECE_UNDERLINE = "\u2581"
# llama2.c's tokenizer export writes BOS/EOS as "\n<s>\n" / "\n</s>\n" so that
# run.c prints them on their own line; the HF tokenizer wants the bare names.
_SPECIAL_TOKENS = {0: "<unk>", 1: "<s>", 2: "</s>"}
_N_BYTE_TOKENS = 256
_BYTE_OFFSET = 3  # ids 3..258 are <0x00>..<0xFF>, as in run.c (byte + 3)

_REEXPORT_HINT = (
    "Re-download the file, or re-export it from the PyTorch checkpoint with "
    "llama2.c's `python export.py out.bin --version 0 --checkpoint ckpt.pt` "
    "(only the legacy version-0 layout is supported)."
)


@dataclass(frozen=True)
class Llama2cHeader:
    """Hyper-parameters from the 7-int32 header of a legacy llama2.c checkpoint."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        """Per-head dimension (``dim // n_heads``)."""
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Output dimension of the key/value projections."""
        return self.n_kv_heads * self.head_size

    def expected_file_size(self) -> int:
        """Exact size in bytes of a legacy (v0) export with this header."""
        d, h, n, kv = self.dim, self.hidden_dim, self.n_layers, self.kv_dim
        n_floats = (
            self.vocab_size * d  # token_embedding
            + n * d  # rms_att
            + n * d * d  # wq
            + 2 * n * kv * d  # wk, wv
            + n * d * d  # wo
            + n * d  # rms_ffn
            + 3 * n * h * d  # w1, w2, w3
            + d  # rms_final
            + self.max_seq_len * self.head_size  # freq_cis_real + freq_cis_imag
            + (0 if self.shared_classifier else self.vocab_size * d)  # wcls
        )
        return _HEADER_BYTES + n_floats * _FLOAT_BYTES


def read_llama2c_header(checkpoint: str | Path) -> Llama2cHeader:
    """Read and sanity-check the header of a legacy llama2.c checkpoint.

    Raises:
        ValueError: if the file is not a legacy (v0) llama2.c export or its
            header is inconsistent.
    """
    path = Path(checkpoint)
    with path.open("rb") as f:
        raw = f.read(_HEADER_BYTES)
    if len(raw) < _HEADER_BYTES:
        raise ValueError(
            f"{path}: {len(raw)} bytes is too short for a llama2.c checkpoint "
            f"(the header alone is {_HEADER_BYTES} bytes). {_REEXPORT_HINT}"
        )
    if struct.unpack_from("<I", raw)[0] == _VERSIONED_MAGIC:
        version = struct.unpack_from("<i", raw, 4)[0]
        raise ValueError(
            f"{path}: this is a versioned llama2.c export (magic 'ak42', version "
            f"{version}); only the legacy version-0 layout is supported. "
            f"{_REEXPORT_HINT}"
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack(
        _HEADER_FORMAT, raw
    )
    header = Llama2cHeader(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        # run.c: "negative vocab size is hacky way of signaling unshared weights"
        vocab_size=abs(vocab_size),
        max_seq_len=seq_len,
        shared_classifier=vocab_size > 0,
    )
    problems = []
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len) <= 0:
        problems.append("all header fields must be non-zero and all but vocab_size positive")
    elif dim % n_heads:
        problems.append(f"dim={dim} is not divisible by n_heads={n_heads}")
    elif n_heads % n_kv_heads:
        problems.append(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    elif (dim // n_heads) % 2:
        problems.append(f"head size {dim // n_heads} must be even for RoPE")
    if problems:
        raise ValueError(
            f"{path}: implausible llama2.c header "
            f"(dim={dim}, hidden_dim={hidden_dim}, n_layers={n_layers}, n_heads={n_heads}, "
            f"n_kv_heads={n_kv_heads}, vocab_size={vocab_size}, seq_len={seq_len}): "
            f"{'; '.join(problems)}. The file is probably not a llama2.c checkpoint or is "
            f"corrupted. {_REEXPORT_HINT}"
        )
    return header


def _read_llama2c_weights(checkpoint: str | Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Return the header and the raw fp32 tensors, in llama2.c's own layout."""
    path = Path(checkpoint)
    header = read_llama2c_header(path)
    expected, actual = header.expected_file_size(), path.stat().st_size
    if actual != expected:
        kind = "truncated" if actual < expected else "has trailing data"
        raise ValueError(
            f"{path}: file size {actual} bytes does not match the {expected} bytes implied by its "
            f"header {header} for a legacy llama2.c export (file {kind}). {_REEXPORT_HINT}"
        )

    h = header
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("token_embedding", (h.vocab_size, h.dim)),
        ("rms_att", (h.n_layers, h.dim)),
        ("wq", (h.n_layers, h.dim, h.dim)),
        ("wk", (h.n_layers, h.kv_dim, h.dim)),
        ("wv", (h.n_layers, h.kv_dim, h.dim)),
        ("wo", (h.n_layers, h.dim, h.dim)),
        ("rms_ffn", (h.n_layers, h.dim)),
        ("w1", (h.n_layers, h.hidden_dim, h.dim)),
        ("w2", (h.n_layers, h.dim, h.hidden_dim)),
        ("w3", (h.n_layers, h.hidden_dim, h.dim)),
        ("rms_final", (h.dim,)),
        # Precomputed RoPE tables of the legacy format; HF recomputes them.
        ("freq_cis_real", (h.max_seq_len, h.head_size // 2)),
        ("freq_cis_imag", (h.max_seq_len, h.head_size // 2)),
    ]
    if not h.shared_classifier:
        shapes.append(("wcls", (h.vocab_size, h.dim)))

    # Little-endian fp32 regardless of host, as written by export.py's struct.pack.
    flat = np.fromfile(path, dtype="<f4", offset=_HEADER_BYTES)
    weights: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        weights[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    assert offset == flat.size  # guaranteed by the size check above
    if h.shared_classifier:
        weights["wcls"] = weights["token_embedding"]
    if not all(np.isfinite(w).all() for w in weights.values()):
        raise ValueError(f"{path}: checkpoint contains NaN/inf weights. {_REEXPORT_HINT}")
    return header, weights


def _interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from llama2.c's to HF's RoPE convention.

    llama2.c (like Meta's original Llama code) rotates adjacent pairs
    ``(2i, 2i+1)`` of each head with frequency ``theta^(-2i/head_size)``; HF's
    ``rotate_half`` instead pairs ``(i, i + head_size/2)`` with the same
    frequency.  Moving row ``2i`` to ``i`` and row ``2i+1`` to
    ``i + head_size/2`` within each head makes HF compute exactly the same
    attention scores (q.k is invariant to a shared permutation of q and k).
    This is the permutation of HF's ``convert_llama_weights_to_hf.py``.
    """
    out_dim, in_dim = w.shape
    head_size = out_dim // n_heads
    return (
        w.reshape(n_heads, head_size // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)
    )


def llama2c_config(header: Llama2cHeader) -> LlamaConfig:
    """Build the :class:`~transformers.LlamaConfig` equivalent to a llama2.c header."""
    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_size,
        hidden_act="silu",
        max_position_embeddings=header.max_seq_len,
        rms_norm_eps=1e-5,  # run.c rmsnorm
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,  # <unk>: never produced thanks to byte fallback, safe for padding
        attention_bias=False,
        mlp_bias=False,
    )


def load_llama2c_model(
    checkpoint: str | Path, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """Load a legacy llama2.c ``.bin`` checkpoint into a ``LlamaForCausalLM``.

    Raises:
        ValueError: if the file is not a well-formed legacy llama2.c export.
    """
    header, w = _read_llama2c_weights(checkpoint)
    config = llama2c_config(header)

    state: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": w["token_embedding"],
        "model.norm.weight": w["rms_final"],
        "lm_head.weight": w["wcls"],
    }
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": w["rms_att"][i],
            p + "self_attn.q_proj.weight": _interleaved_to_half_split(w["wq"][i], header.n_heads),
            p + "self_attn.k_proj.weight": _interleaved_to_half_split(w["wk"][i], header.n_kv_heads),
            p + "self_attn.v_proj.weight": w["wv"][i],
            p + "self_attn.o_proj.weight": w["wo"][i],
            p + "post_attention_layernorm.weight": w["rms_ffn"][i],
            p + "mlp.gate_proj.weight": w["w1"][i],
            p + "mlp.down_proj.weight": w["w2"][i],
            p + "mlp.up_proj.weight": w["w3"][i],
        }

    model = LlamaForCausalLM(config)
    # Copy rather than wrap: the memory-mapped numpy views are read-only.
    model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()},
        strict=True,
    )
    if header.shared_classifier:
        # load_state_dict copies into the shared parameter twice (same data),
        # but make the tie explicit so save_pretrained de-duplicates it.
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # The TinyStories models are trained on BOS-delimited stories and never emit
    # EOS: run.c stops generating at BOS.  Mirror that in generate() defaults,
    # while config.eos_token_id stays the tokenizer's </s>.
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = [2, 1]
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def _read_tokenizer_bin(path: str | Path) -> tuple[list[str], list[float], int]:
    """Parse a llama2.c ``tokenizer.bin``: pieces (as stored), scores, max_token_length."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be a llama2.c tokenizer file.")
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    offset = 4
    pieces: list[str] = []
    scores: list[float] = []
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(f"{path}: truncated llama2.c tokenizer (entry {len(pieces)}).")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or offset + length > len(data):
            raise ValueError(f"{path}: truncated or corrupted llama2.c tokenizer (entry {len(pieces)}).")
        pieces.append(data[offset : offset + length].decode("utf-8"))
        scores.append(score)
        offset += length
    return pieces, scores, max_token_length


def _llama2c_encode(text: str, pieces: list[str], scores: list[float]) -> list[int]:
    """Reference re-implementation of run.c's ``encode`` (without BOS/EOS).

    Kept deliberately literal (quadratic) so tests can check the fast
    tokenizer against it: prepend a dummy-prefix space, map each code point to
    its piece (or to byte tokens ``byte + 3``), then repeatedly merge the
    adjacent pair whose concatenation is the highest-scoring vocab piece,
    leftmost on ties.  ``pieces`` are llama2.c's strings (plain spaces).
    """
    lookup = {piece: i for i, piece in enumerate(pieces)}
    tokens: list[int] = []
    if text:  # run.c adds the dummy prefix only for non-empty text
        tokens.append(lookup[" "])
    for ch in text:
        if ch in lookup:
            tokens.append(lookup[ch])
        else:
            tokens.extend(b + _BYTE_OFFSET for b in ch.encode("utf-8"))
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


def _build_tokenizers_bpe(pieces: list[str], scores: list[float]) -> Tokenizer:
    """Convert llama2.c's vocab into an equivalent ``tokenizers`` BPE model.

    run.c merges by the *score of the merged piece*; a HF BPE applies merges by
    rank.  Emitting, for every piece, each split into two vocab pieces and
    ranking those merges by descending score of the result gives the same
    merge order.  (One theoretical difference: when two *different* splits of
    the same piece overlap in one text, run.c takes the leftmost and HF the
    lower-ranked; this is the same approximation HF's own SentencePiece
    converter makes.)
    """
    hf_pieces = [_SPECIAL_TOKENS.get(i, p.replace(" ", _SPIECE_UNDERLINE)) for i, p in enumerate(pieces)]
    for b in range(_N_BYTE_TOKENS):
        if hf_pieces[b + _BYTE_OFFSET] != f"<0x{b:02X}>":
            raise ValueError(
                f"expected byte-fallback piece <0x{b:02X}> at id {b + _BYTE_OFFSET}, "
                f"got {hf_pieces[b + _BYTE_OFFSET]!r}: not a llama2.c SentencePiece tokenizer."
            )
    vocab = {piece: i for i, piece in enumerate(hf_pieces)}
    if len(vocab) != len(hf_pieces):
        raise ValueError("llama2.c tokenizer has duplicate pieces; cannot build a BPE vocab.")

    ranked: list[tuple[float, int, int, int]] = []
    for merged_id, piece in enumerate(hf_pieces):
        # Specials and byte pieces are never merge results of normal text.
        if merged_id < _BYTE_OFFSET + _N_BYTE_TOKENS:
            continue
        for k in range(1, len(piece)):
            left, right = vocab.get(piece[:k]), vocab.get(piece[k:])
            if left is not None and right is not None:
                ranked.append((-scores[merged_id], merged_id, left, right))
    ranked.sort()
    merges = [(hf_pieces[left], hf_pieces[right]) for _, _, left, right in ranked]

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=False,  # run.c never fuses (and byte fallback means no <unk> anyway)
            ignore_merges=False,  # run.c always merges bottom-up, even for whole-vocab words
        )
    )
    # SentencePiece's add_dummy_prefix + whitespace escaping, as in HF's Llama
    # fast tokenizer.  No pre-tokenizer: like run.c, the whole text is one
    # sequence for merging.  Prepend is a no-op on "", matching run.c.
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPIECE_UNDERLINE), normalizers.Replace(" ", _SPIECE_UNDERLINE)]
    )
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),  # drop the dummy prefix again
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def load_llama2c_tokenizer(tokenizer: str | Path) -> PreTrainedTokenizerFast:
    """Convert a llama2.c ``tokenizer.bin`` into a ``PreTrainedTokenizerFast``.

    The result adds BOS (not EOS) when encoding, pads on the left with
    ``<unk>`` and round-trips through ``save_pretrained`` /
    ``AutoTokenizer.from_pretrained`` without custom code.
    """
    pieces, scores, _ = _read_tokenizer_bin(tokenizer)
    if len(pieces) < _BYTE_OFFSET + _N_BYTE_TOKENS:
        raise ValueError(f"{tokenizer}: only {len(pieces)} pieces; not a llama2.c tokenizer.")
    return PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizers_bpe(pieces, scores),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        # Passing these explicitly makes transformers persist them and rebuild
        # the same "<s> $A" post-processor on reload.
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        model_max_length=None,
        clean_up_tokenization_spaces=False,
    )


def load_llama2c(
    checkpoint: str | Path, tokenizer: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a llama2.c model and its tokenizer as standard HF objects.

    Args:
        checkpoint: legacy (version-0) llama2.c ``.bin`` export.
        tokenizer: llama2.c ``tokenizer.bin`` (e.g. ``tok512.bin``) matching it.
        dtype: dtype of the returned model's parameters.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        ValueError: on a malformed checkpoint/tokenizer or when their
            vocabulary sizes disagree.
    """
    header = read_llama2c_header(checkpoint)
    tok = load_llama2c_tokenizer(tokenizer)
    if len(tok) != header.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer} has {len(tok)} pieces but checkpoint {checkpoint} expects "
            f"vocab_size={header.vocab_size}; pass the tokenizer exported with this model."
        )
    model = load_llama2c_model(checkpoint, dtype=dtype)
    tok.model_max_length = header.max_seq_len
    return model, tok
