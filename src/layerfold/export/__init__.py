"""Export: a checkpoint written where users run models (GGUF for llama.cpp / Ollama), and whether it is stock.

- :func:`export_gguf` writes a llama-family checkpoint as GGUF (f32, f16, bf16, Q8_0, Q4_0, Q4_1, or each
  tensor's type in the source GGUF), tokenizer and chat template carried over; :func:`check_export` refuses
  what it cannot write before anything is written.
- :func:`checkpoint_kind` says whether a checkpoint is a stock transformers checkpoint (``"stock"``) or
  needs something a stock loader lacks (``"custom: <reason>"``); :func:`serving_config_problems` checks a
  config the way serving engines read it.
"""

from layerfold.export.errors import ExportError
from layerfold.export.stock import STOCK, checkpoint_kind, custom_reasons, serving_config_problems, tensor_shapes
from layerfold.export.writer import ARCHITECTURES, QUANTIZATIONS, TYPES, SourceGGUF, check_export, export_gguf

__all__ = [
    "ARCHITECTURES", "ExportError", "QUANTIZATIONS", "STOCK", "SourceGGUF", "TYPES", "check_export", "checkpoint_kind",
    "custom_reasons", "export_gguf", "serving_config_problems", "tensor_shapes",
]
