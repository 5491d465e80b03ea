"""The export settings checked against the model in the ``validate`` stage, before any stage runs."""

from __future__ import annotations

from omegaconf import DictConfig

from layerfold.export.writer import ARCHITECTURES, TYPES
from layerfold.models.facts import ModelFacts

GGUF_SOURCES = ("gguf", "package")  # model sources that are a GGUF file


def export_problems(params: DictConfig, facts: ModelFacts) -> list[str]:
    """What rules out ``export`` for this model (empty when it is off or fits): each names key, value, allowed and fix."""
    export = params.get("export")
    if export is None or not export.get("enabled"):
        return []
    problems = []
    if facts.model_type not in ARCHITECTURES:
        problems.append(
            f"export.enabled=true, but the model's architecture '{facts.model_type}' has no GGUF writer in layerfold "
            f"(it writes: {', '.join(ARCHITECTURES)}). Set `-S export.enabled=false`, or convert the checkpoint with "
            "llama.cpp's convert_hf_to_gguf.py."
        )
    if export.get("quantization") == "source" and params.model.source not in GGUF_SOURCES:
        problems.append(
            f"export.quantization=source takes each tensor's type from the source GGUF, but model.source={params.model.source} "
            f"is not a GGUF. Choose one of {', '.join(TYPES)} (`-S export.quantization=q8_0`)."
        )
    return problems
