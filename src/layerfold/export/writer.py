"""Write a layerfold checkpoint as a GGUF file that llama.cpp (and Ollama, LM Studio, transformers' GGUF reader) loads.

The checkpoint is read tensor by tensor from its safetensors files and written through the ``gguf`` package's
``GGUFWriter``; quantised types go through ``gguf.quants``. Names, metadata keys and the rotary permutation
follow llama.cpp's ``convert_hf_to_gguf.py`` for the llama architecture:

- tensor names from ``gguf``'s own llama name map (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``);
- query and key projections (and their biases) permuted from the Hugging Face rotary layout (halves) back
  to the interleaved pairs llama.cpp rotates (transformers' GGUF reader undoes exactly this permutation);
- ``llama.block_count`` = the checkpoint's ``num_hidden_layers``, context length, embedding and FFN widths,
  query and key-value head counts (grouped-query attention), RMS-norm epsilon, rope base and dimension,
  ``key_length``/``value_length`` when the head dimension is not ``hidden / heads``, linear rope scaling or
  Llama-3's ``rope_freqs`` tensor, and no ``output.weight`` when the embeddings are tied;
- 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them.

Which type each 2-D tensor gets (``quantization``):

- ``source``: the type the source GGUF gives that tensor's role (``attn_q``, ``ffn_down``, ``token_embd``, ...;
  the most common over its layers), so a Q4_1 file comes back Q4_1 with its Q8_0 embedding;
- ``f32``, ``f16``, ``bf16``, ``q8_0``: every 2-D tensor;
- ``q4_0``, ``q4_1``: every 2-D tensor, except the one that projects onto the vocabulary (``output.weight``, or
  ``token_embd.weight`` when tied), which gets Q8_0: llama.cpp's quantiser keeps that tensor at a higher
  precision (Q6_K, or Q8_0 when its rows are not a multiple of 256); ``gguf`` cannot write Q6_K, so Q8_0;
- a tensor whose rows are not a multiple of the type's block (32) falls back to F16, as ``convert_hf_to_gguf.py`` does.

Everything that can refuse the export (an unknown quantisation, a missing folder, an architecture or rope
scaling the writer does not know, a non-stock checkpoint, a source GGUF that is not this checkpoint's
ancestor, a tokenizer that cannot be converted) is checked by :func:`check_export` before a byte is written;
the file is written to a temporary sibling and renamed on success.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    get_tensor_name_map,
)
from gguf import quants
from gguf.gguf_writer import WriterState
from gguf.utility import size_label
from safetensors import safe_open
from tqdm.auto import tqdm

from layerfold.export.errors import ExportError
from layerfold.export.stock import CUSTOM_PREFIX, STOCK, checkpoint_kind
from layerfold.export.vocab import copy_source_tokenizer, hf_tokenizer_problem, write_hf_tokenizer
from layerfold.io import atomic_file, file_sha256
from layerfold.models.sources import IDENTITY_ATTR, resolve_pointer

log = logging.getLogger(__name__)

T = GGMLQuantizationType
# export.quantization -> the GGML type of every 2-D tensor ("source": per role, from the source GGUF)
TYPES: dict[str, GGMLQuantizationType] = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
QUANTIZATIONS: tuple[str, ...] = ("source", *TYPES)
WRITABLE = frozenset(TYPES.values())
# GGUF architectures layerfold writes, by transformers model_type
ARCHITECTURES: dict[str, MODEL_ARCH] = {"llama": MODEL_ARCH.LLAMA}
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
              T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1}
LOW_BIT = frozenset({T.Q4_0, T.Q4_1})
LOGITS_FALLBACK = T.Q8_0  # the vocabulary projection's type under a 4-bit export (llama.cpp's quantiser: Q6_K/Q8_0)
ROPE_TYPES = ("default", "linear", "llama3")
# general.* keys of the source that describe the original file, not the exported one
_OWN_GENERAL_KEYS = ("general.architecture", "general.name", "general.size_label", "general.file_type",
                     "general.quantization_version", "general.type", "general.description")
_BLOCK = re.compile(r"^blk\.\d+\.")


def role(gguf_name: str) -> str:
    """A tensor's role, the same in every block: ``blk.7.attn_q.weight`` -> ``attn_q.weight``."""
    return _BLOCK.sub("", gguf_name)


@dataclass
class SourceGGUF:
    """The GGUF file a checkpoint descends from: its tokenizer and general metadata are carried over and,
    for ``quantization=source``, each tensor role's type."""

    path: Path

    @cached_property
    def reader(self) -> GGUFReader:
        try:
            return GGUFReader(str(self.path))
        except Exception as err:  # the reader raises ValueError/struct errors on truncated or foreign files
            raise ExportError(f"{self.path} is not a readable GGUF file ({type(err).__name__}: {err}).") from None

    @cached_property
    def role_types(self) -> dict[str, GGMLQuantizationType]:
        """``{role: the most common type of that role's tensors}``."""
        counts: dict[str, Counter] = {}
        for tensor in self.reader.tensors:
            counts.setdefault(role(tensor.name), Counter())[T(tensor.tensor_type)] += 1
        return {name: counter.most_common(1)[0][0] for name, counter in counts.items()}

    @property
    def architecture(self) -> str:
        return str(self.reader.fields["general.architecture"].contents())

    @property
    def name(self) -> str | None:
        field = self.reader.fields.get("general.name")
        return str(field.contents()) if field is not None else None


@dataclass
class ExportPlan:
    """Everything :func:`export_gguf` needs, checked: paths, config, types, tokenizer source."""

    checkpoint: Path
    output: Path
    quantization: str
    config: Any  # transformers PretrainedConfig
    source: SourceGGUF | None
    weight_files: list[Path]
    tied: bool
    plan: dict | None = None  # the checkpoint's plan.json (which layers it keeps), when present
    notes: list[str] = field(default_factory=list)


def check_export(checkpoint: str | Path, output: str | Path, quantization: str = "source", source_gguf: str | Path | None = None) -> ExportPlan:
    """Refuse, with the key, the value, what is allowed and the fix, anything :func:`export_gguf` cannot write."""
    from transformers import AutoConfig

    output = Path(output)
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"export.quantization={quantization!r} is not a quantisation layerfold can write: it must be one of "
                          f"{', '.join(QUANTIZATIONS)}. Fix it with `-S export.quantization=q8_0` (or f16, bf16, q4_0, q4_1; "
                          "source = each tensor's type in the source GGUF).")
    if not output.parent.is_dir():
        raise ExportError(f"export output={str(output)!r}: the folder {str(output.parent)!r} does not exist. Create it first "
                          "or write into an existing folder.")
    if output.is_dir():
        raise ExportError(f"export output={str(output)!r} is a directory; name the .gguf file to write.")
    if not (Path(checkpoint) / "config.json").exists() and not (Path(checkpoint) / "pointer.json").exists():
        raise ExportError(f"export checkpoint={str(checkpoint)!r} holds no checkpoint (no config.json); run the stage that writes it first.")
    directory = resolve_pointer(checkpoint)
    kind = checkpoint_kind(directory)
    if kind != STOCK:
        raise ExportError(f"{directory} is not a stock checkpoint, so a GGUF of it would be a different model: "
                          f"{kind.removeprefix(CUSTOM_PREFIX)}. Export a stock output instead (for LLM-Streamline, "
                          "method.replacement=ffn, swiglu, transformer_layer or none).")
    config = AutoConfig.from_pretrained(directory)
    if config.model_type not in ARCHITECTURES:
        raise ExportError(f"Cannot export architecture '{config.model_type}' ({', '.join(config.architectures or [])}) to GGUF: "
                          f"layerfold's GGUF writer knows {', '.join(ARCHITECTURES)}. Use llama.cpp's convert_hf_to_gguf.py "
                          "on the checkpoint, or add the family to layerfold.export.writer.ARCHITECTURES.")
    _check_llama_config(config)
    source = SourceGGUF(Path(source_gguf)) if source_gguf is not None else None
    if source is not None:
        _check_source(source, config)
    if quantization == "source":
        if source is None:
            raise ExportError("export.quantization=source takes each tensor's type from the source GGUF, but this checkpoint "
                              "does not descend from a GGUF (or none was given). Choose one of "
                              f"{', '.join(TYPES)} (`-S export.quantization=q8_0`).")
        unwritable = {name: t.name for name, t in source.role_types.items() if t not in WRITABLE}
        if unwritable:
            raise ExportError(f"export.quantization=source: the source GGUF stores {_listing(unwritable)}, which the gguf package cannot "
                              f"write (it writes {', '.join(t.name for t in WRITABLE)}). Choose export.quantization explicitly, "
                              "e.g. `-S export.quantization=q4_1` or q8_0.")
    if source is None:
        problem = hf_tokenizer_problem(directory)
        if problem is not None:
            raise ExportError(f"Cannot convert the checkpoint's tokenizer to GGUF: {problem}. Export a checkpoint that descends from "
                              "a GGUF source (its tokenizer is copied), or one with a SentencePiece-style BPE tokenizer.")
    weight_files = _weight_files(directory)
    names = set()
    for file in weight_files:
        with safe_open(str(file), "pt") as handle:
            names |= set(handle.keys())
    tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in names
    plan_file = Path(checkpoint) / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else None
    return ExportPlan(directory, output, quantization, config, source, weight_files, tied, plan)


def _check_llama_config(config: Any) -> None:
    """What llama.cpp's llama architecture cannot express, refused with the setting that says so."""
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if not isinstance(getattr(config, key, None), int):
            raise ExportError(f"config.json's {key}={getattr(config, key, None)!r}: the llama GGUF writer needs one number for "
                              "every layer (transformers' GGUF reader reads no per-layer list).")
    if config.hidden_act != "silu":
        raise ExportError(f"config.json's hidden_act={config.hidden_act!r}: llama.cpp's llama architecture computes SiLU (SwiGLU); "
                          "a checkpoint with another activation cannot be written as llama.")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise ExportError(f"config.json's rope_parameters.rope_type={rope.get('rope_type')!r}: layerfold's llama GGUF writer writes "
                          f"{', '.join(ROPE_TYPES)} rope (llama.cpp's other scalings need keys it does not write).")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ExportError(f"config.json's partial_rotary_factor={rope['partial_rotary_factor']}: the llama architecture rotates the whole head.")


def _check_source(source: SourceGGUF, config: Any) -> None:
    """The source GGUF must be the file this checkpoint was made from (same architecture, vocabulary, and hash)."""
    if source.architecture != "llama":
        raise ExportError(f"The source GGUF {source.path.name} is a '{source.architecture}' file; the checkpoint is llama.")
    recorded = (getattr(config, IDENTITY_ATTR, None) or {}).get("sha256")
    if recorded and recorded != file_sha256(source.path):
        raise ExportError(f"The source GGUF {source.path} is not the file this checkpoint descends from (its sha256 differs from "
                          f"{IDENTITY_ATTR}.sha256 = {recorded} in config.json). Point model.path (or the package) at that file.")
    tokens = source.reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != config.vocab_size:
        raise ExportError(f"The source GGUF's tokenizer has {len(tokens.data)} tokens but the checkpoint's vocab_size is {config.vocab_size}.")


def _listing(mapping: dict[str, str]) -> str:
    return ", ".join(f"{k} as {v}" for k, v in sorted(mapping.items()))


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(p for p in directory.glob("*.safetensors") if p.name.startswith("model"))
    if not files:
        raise ExportError(f"{directory} has no safetensors weights (model*.safetensors).")
    return files


def _tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


def to_interleaved_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query/key projection (or bias) from Hugging Face's rotary layout (first half, second half of
    each head) to llama.cpp's interleaved pairs: the permutation of ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_type(gguf_name: str, shape: tuple[int, ...], quantization: str, source: SourceGGUF | None, tied: bool) -> tuple[GGMLQuantizationType, str | None]:
    """``(type, why it differs from the requested one or None)`` for one tensor."""
    if len(shape) < 2:
        return T.F32, None
    if quantization == "source":
        assert source is not None
        wanted = source.role_types.get(role(gguf_name))
        if wanted is None:  # a role the source lacks (an untied head): the source's most common 2-D type
            wanted = Counter(t for name, t in source.role_types.items() if name.endswith(".weight") and t != T.F32).most_common(1)[0][0]
    else:
        wanted = TYPES[quantization]
        logits = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        if wanted in LOW_BIT and logits:
            return LOGITS_FALLBACK, "the vocabulary projection: llama.cpp's quantiser keeps it at higher precision"
    block = GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return T.F16, f"rows of {shape[-1]} are not a multiple of {wanted.name}'s block of {block}"
    return wanted, None


def encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``array`` (float32) in ``qtype``'s bytes, as ``GGUFWriter.add_tensor`` takes them."""
    if qtype == T.F32:
        return array.astype(np.float32)
    if qtype == T.F16:
        return array.astype(np.float16)
    return quants.quantize(array, qtype)


def export_gguf(checkpoint: str | Path, output: str | Path, quantization: str = "source", source_gguf: str | Path | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Write ``checkpoint`` (a layerfold / HF llama checkpoint directory) as the GGUF file ``output``; return what was written.

    The report holds the file's size, its tensor types, the tensors that fell back to another type and why, and
    for each written type the relative RMS error of the written tensors against the checkpoint's (the measured
    (re-)quantisation error; 0 for f32, and for bf16 of a bf16 checkpoint).
    """
    plan = check_export(checkpoint, output, quantization, source_gguf)
    config, source = plan.config, plan.source
    writer = GGUFWriter(None, "llama")
    name_map = get_tensor_name_map(ARCHITECTURES[config.model_type], config.num_hidden_layers)
    types: Counter = Counter()
    fallbacks: dict[str, str] = {}
    errors: dict[str, list[float]] = {}  # type -> [sum of squared errors, sum of squares, tensors]
    entries = []
    count = 0
    for file in plan.weight_files:
        with safe_open(str(file), "pt") as handle:
            count += len(handle.keys())
    # One checkpoint tensor in memory at a time (plus what is already encoded for the file).
    for hf_name, tensor in tqdm(_tensors(plan.weight_files), total=count, desc="GGUF tensors", unit="tensor", disable=not progress):
        if hf_name == "lm_head.weight" and plan.tied:
            continue
        module, _, suffix = hf_name.rpartition(".")
        base = name_map.get_name(module)
        if base is None:
            raise ExportError(f"The checkpoint's tensor {hf_name} has no llama GGUF name; the llama writer cannot place it.")
        gguf_name = f"{base}.{suffix}"
        array = tensor.float().numpy()
        if base.endswith(".attn_q"):
            array = to_interleaved_rotary(array, config.num_attention_heads)
        elif base.endswith(".attn_k"):
            array = to_interleaved_rotary(array, config.num_key_value_heads)
        qtype, why = tensor_type(gguf_name, array.shape, quantization, source, plan.tied)
        if why is not None:
            fallbacks[gguf_name] = f"{qtype.name}: {why}"
        data = encode(array, qtype)
        _accumulate(errors, qtype, array, data)
        entries.append((gguf_name, data, qtype))
        types[qtype.name] += 1
    entries += _rope_tensors(config)
    for gguf_name, data, qtype in sorted(entries, key=lambda e: _order(e[0])):
        writer.add_tensor(gguf_name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
    file_type = _file_type(entries)
    _add_metadata(writer, plan, file_type)
    tokenizer = _add_tokenizer(writer, plan)
    with atomic_file(plan.output, "wb") as handle:
        # GGUFWriter opens its own files by path; hand it the temporary file instead, so a killed export leaves
        # no file that looks finished (layerfold.io.atomic_file renames it on success).
        writer.fout, writer.state = [handle], WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.fout = None  # atomic_file closes the handle
    return {
        "file": plan.output.name,
        "bytes": plan.output.stat().st_size,
        "architecture": "llama",
        "block_count": config.num_hidden_layers,
        "quantization": quantization,
        "file_type": file_type.name,
        "tensor_types": dict(types.most_common()),
        "fallbacks": fallbacks,
        "relative_rms_error": {name: (float(np.sqrt(e[0] / e[1])) if e[1] else 0.0) for name, e in sorted(errors.items())},
        "tokenizer": tokenizer,
        "tied_embeddings": plan.tied,
        "source_gguf": {"file": source.path.name, "sha256": file_sha256(source.path)} if source else None,
        "checkpoint_kind": STOCK,
    }


def _accumulate(errors: dict[str, list[float]], qtype: GGMLQuantizationType, array: np.ndarray, data: np.ndarray) -> None:
    """Add one tensor's squared error (written vs checkpoint values) to its type's total."""
    written = data.astype(np.float32) if qtype in (T.F32, T.F16) else quants.dequantize(data, qtype)
    total = errors.setdefault(qtype.name, [0.0, 0.0])
    total[0] += float(np.square(written.astype(np.float64) - array).sum())
    total[1] += float(np.square(array.astype(np.float64)).sum())


def _order(gguf_name: str) -> tuple[int, int, str]:
    """The order llama.cpp's converter writes: embedding, blocks in index order, then the final norm and head."""
    match = re.match(r"blk\.(\d+)\.", gguf_name)
    if match:
        return 1, int(match.group(1)), gguf_name
    return (0, 0, gguf_name) if gguf_name.startswith(("token_embd", "rope_freqs")) else (2, 0, gguf_name)


def _file_type(entries: list[tuple[str, np.ndarray, GGMLQuantizationType]]) -> LlamaFileType:
    """``general.file_type``: the type holding most of the 2-D tensors' elements (llama.cpp's "mostly" type)."""
    weight: Counter = Counter()
    for _, data, qtype in entries:
        if data.ndim >= 2:
            weight[qtype] += data.nbytes
    return FILE_TYPES[weight.most_common(1)[0][0]]


def _rope_tensors(config: Any) -> list[tuple[str, np.ndarray, GGMLQuantizationType]]:
    """Llama-3 rope scaling as llama.cpp reads it: a ``rope_freqs`` tensor, one divisor per rotary frequency
    (1 for short wavelengths, ``factor`` for long ones, a smooth blend between: Llama 3.1's rule, which
    transformers applies to its own frequencies; a test holds the two to the same values)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type") != "llama3":
        return []
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = rope.get("rope_theta", 10000.0)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    divisors = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)):
        wavelength = 2 * np.pi / freq
        if wavelength < context / high:
            divisors.append(1.0)
        elif wavelength > context / low:
            divisors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", np.asarray(divisors, dtype=np.float32), T.F32)]


def _add_metadata(writer: GGUFWriter, plan: ExportPlan, file_type: LlamaFileType) -> None:
    config, source = plan.config, plan.source
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_type("model")
    identity = getattr(config, IDENTITY_ATTR, None) or {}
    base_name = identity.get("name") or (source.name if source else None) or Path(str(config._name_or_path or plan.checkpoint)).name
    writer.add_name(f"{base_name} {config.num_hidden_layers} layers")
    if source is not None:
        for key, field_ in source.reader.fields.items():
            if key.startswith("general.") and key not in _OWN_GENERAL_KEYS:
                vtype = field_.types[0]
                writer.add_key_value(key, field_.contents(), vtype, sub_type=field_.types[-1] if vtype == GGUFValueType.ARRAY else None)
    if plan.plan is not None:
        method = (plan.plan.get("method") or {}).get("name", "?")
        writer.add_description(f"layerfold: {plan.plan.get('original_layers', '?')} -> {config.num_hidden_layers} decoder layers "
                               f"({method}) of {base_name}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(file_type)
    if file_type not in (LlamaFileType.ALL_F32, LlamaFileType.MOSTLY_F16, LlamaFileType.MOSTLY_BF16):
        writer.add_quantization_version(GGML_QUANT_VERSION)
    total, shared, expert, experts = writer.get_total_parameter_count()
    writer.add_size_label(size_label(total, shared, expert, experts))


def _add_tokenizer(writer: GGUFWriter, plan: ExportPlan) -> str:
    if plan.source is not None:
        copy_source_tokenizer(plan.source.reader, writer)
        return f"copied from {plan.source.path.name}"
    write_hf_tokenizer(plan.checkpoint, writer, plan.config.vocab_size)
    return "converted from the checkpoint's tokenizer.json"
