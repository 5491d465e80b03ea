"""The tokenizer of an exported GGUF: copied from the source GGUF, or converted from the checkpoint's HF tokenizer.

A GGUF carries its tokenizer as ``tokenizer.*`` metadata under llama.cpp's key names. When the checkpoint
descends from a GGUF (layerfold's default model), those keys are copied unchanged, chat template included:
the vocabulary does not change when layers do. Otherwise the HF tokenizer is converted, following
llama.cpp's ``convert_hf_to_gguf.py`` for a SentencePiece-style BPE (byte fallback, ``▁`` for spaces, as
Llama-2 and the llama2.c models use): ``tokenizer.ggml.model = "llama"``, one score per token (llama.cpp's
SentencePiece tokenizer merges the adjacent pair whose *merged piece* scores highest), token types, and the
merges themselves (transformers' GGUF reader builds its BPE from them). The score of a piece is minus the
rank of the merge that makes it, so both readers merge in the HF tokenizer's order. Byte-level BPE
tokenizers (GPT-2 style) need llama.cpp's name for their pre-tokenizer, which llama.cpp finds by hashing
the tokenization of a fixed text against its own table; layerfold does not reproduce that table and refuses
them unless a source GGUF supplies the tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType, GGUFWriter, TokenType

from layerfold.export.errors import ExportError

# Keys the source GGUF's tokenizer is copied from; ``tokenizer.*`` covers the vocabulary, merges, special
# ids, add_bos/eos flags and chat templates.
TOKENIZER_PREFIX = "tokenizer."
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def copy_source_tokenizer(reader: GGUFReader, writer: GGUFWriter) -> int:
    """Copy every ``tokenizer.*`` key of the source GGUF with its value type; return the vocabulary size."""
    copied = 0
    for key, field in reader.fields.items():
        if not key.startswith(TOKENIZER_PREFIX):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
        copied += 1
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ExportError("The source GGUF has no tokenizer.ggml.tokens, so it has no tokenizer to carry over; export "
                          "from a checkpoint whose tokenizer layerfold can convert (a SentencePiece-style BPE).")
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def hf_tokenizer_problem(tokenizer_dir: Path) -> str | None:
    """Why the HF tokenizer in ``tokenizer_dir`` cannot be converted (None when it can)."""
    file = Path(tokenizer_dir) / "tokenizer.json"
    if not file.exists():
        return f"{file} does not exist (layerfold converts fast tokenizers, saved as tokenizer.json)"
    model = json.loads(file.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        return f"the tokenizer is a {model.get('type')} model; layerfold converts BPE tokenizers only"
    if not model.get("byte_fallback"):
        return ("the tokenizer is a byte-level BPE (no byte fallback): llama.cpp names its pre-tokenizer from a hash table "
                "layerfold does not reproduce")
    return None


def write_hf_tokenizer(tokenizer_dir: Path, writer: GGUFWriter, vocab_size: int) -> int:
    """Write a SentencePiece-style BPE HF tokenizer as llama.cpp's ``llama`` tokenizer; return its size."""
    from transformers import AutoTokenizer

    problem = hf_tokenizer_problem(tokenizer_dir)
    if problem is not None:
        raise ExportError(f"Cannot convert the checkpoint's tokenizer to GGUF: {problem}. Export a checkpoint that descends from a "
                          "GGUF source (its tokenizer is copied), or one with a SentencePiece-style BPE tokenizer.")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"].get("merges", [])]
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    if size > vocab_size:
        raise ExportError(f"The tokenizer has {size} tokens but the embedding only {vocab_size} rows: it does not belong to this model.")
    pieces = [""] * vocab_size
    for piece, index in vocab.items():
        pieces[index] = piece
    # llama.cpp requires one entry per embedding row; rows the tokenizer never produces get placeholder pieces.
    for index in range(vocab_size):
        if not pieces[index]:
            pieces[index] = f"[PAD{index}]"
    rank = {left + right: i for i, (left, right) in reversed(list(enumerate(merges)))}
    special = set(tokenizer.all_special_ids)
    added = {index for index in tokenizer.added_tokens_decoder if index not in special}
    scores, types = [], []
    for index, piece in enumerate(pieces):
        if index in special:
            scores.append(0.0)
            types.append(TokenType.CONTROL)
        elif _BYTE_PIECE.fullmatch(piece):
            scores.append(0.0)
            types.append(TokenType.BYTE)
        elif index in added:
            scores.append(0.0)
            types.append(TokenType.USER_DEFINED)
        elif piece.startswith("[PAD") and piece not in vocab:
            scores.append(-1e9)
            types.append(TokenType.UNUSED)
        else:
            # Merge results rank by their merge; pieces no merge makes (single characters) are never a merge
            # target and come after every merge result.
            scores.append(-float(rank.get(piece, len(merges) + index)))
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_token_merges([f"{left} {right}" for left, right in merges])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("unk", writer.add_unk_token_id),
                      ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(int(token_id))
    adds_bos, adds_eos = _added_specials(tokenizer)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)
    writer.add_add_space_prefix(_adds_space_prefix(spec))
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)
    return vocab_size


def _added_specials(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds BOS and EOS, from what the tokenizer does (its post-processor), not from its
    ``add_bos_token`` attribute, which a saved fast tokenizer may leave False while adding BOS."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and len(full) > len(plain) and full[0] == bos and plain[:1] != [bos]
    adds_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and plain[-1:] != [eos]
    return adds_bos, adds_eos


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (a ``Prepend`` normalizer or ``Metaspace`` prepending)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text

