"""Model cards: the ``README.md`` every checkpoint layerfold writes carries, as Hugging Face checkpoints do.

A card names the base model and its identity (file, sha256), the method and its settings, the plan in one
line, the metrics known when the checkpoint is written (or where they will be) and how to load it. DVC
hashes the output folders the cards live in, so a card is a function of the run's inputs only: no date, no
library version, no machine path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from layerfold.io import atomic_file
from layerfold.models.patches import PATCH_FILE
from layerfold.models.replacement import SIDE_FILE
from layerfold.models.sources import IDENTITY_ATTR

CARD_FILE = "README.md"


def needs_layerfold_loader(folder: str | Path) -> bool:
    """Whether ``folder`` holds layers or patches no stock class expresses (side files next to the stock checkpoint).

    ``AutoModelForCausalLM.from_pretrained`` loads such a folder without complaint but without the side files:
    a different model. :func:`layerfold.models.load_checkpoint` re-attaches them.
    """
    return any((Path(folder) / name).exists() for name in (SIDE_FILE, PATCH_FILE))


def _settings_line(settings: dict[str, Any]) -> str:
    """Scalar settings as ``key=value``; a list or mapping by its length (the whole of it is in plan.json)."""
    shown = []
    for key, value in sorted(settings.items()):
        if key == "name":
            continue
        if isinstance(value, (list, tuple, dict)):
            value = f"<{len(value)} entries>"
        shown.append(f"{key}={value}")
    return ", ".join(shown) or "defaults"


def _how_to_load(folder: Path, path_hint: str) -> list[str]:
    if needs_layerfold_loader(folder):
        kept = [name for name in (SIDE_FILE, PATCH_FILE) if (folder / name).exists()]
        return [
            f"This checkpoint keeps layers or patches no stock transformers class expresses in {', '.join(f'`{k}`' for k in kept)}: "
            "load it with layerfold's loader (`from_pretrained` alone would silently leave them out).",
            "",
            "```python",
            "from layerfold.models import load_checkpoint",
            f'model, tokenizer = load_checkpoint("{path_hint}")',
            "```",
        ]
    return [
        "A plain transformers checkpoint (safetensors, config, tokenizer):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{path_hint}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{path_hint}")',
        "```",
    ]


def model_card(folder: str | Path, *, title: str, path_hint: str, method: dict[str, Any] | None, plan_line: str | None,
               recovery: dict[str, Any] | None = None, metrics: list[str] = (), base_model_id: str | None = None,
               load_lines: list[str] | None = None, identity_from: str | Path | None = None) -> str:
    """The card of the checkpoint in ``folder`` (read for its identity and side files) as Markdown with YAML front matter.

    ``path_hint`` is the folder as a user types it (relative to the project, never absolute); ``metrics`` lines
    known when the card is written, or where the run writes them; ``load_lines`` replace the loading section
    (a GGUF file is not loaded by ``from_pretrained``); ``identity_from``: the checkpoint folder whose
    ``config.json`` names the base model, when ``folder`` has none.
    """
    folder = Path(folder)
    config_file = Path(identity_from or folder) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    source = config.get(IDENTITY_ATTR) or {}
    name = source.get("name") or config.get("_name_or_path") or "unknown"
    tags = ["layerfold", "layer-pruning"]
    if method:
        tags.append(str(method.get("name")))
    if recovery:
        tags.append(f"recovery-{recovery.get('name')}")
    front: dict[str, Any] = {}
    if base_model_id:
        front["base_model"] = base_model_id
    front["library_name"] = "transformers"
    front["tags"] = tags
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    lines += ["## Base model", ""]
    lines.append(f"- name: `{name}`" + (f" (`{base_model_id}` on the Hugging Face hub)" if base_model_id else ""))
    for key in ("file", "quantization", "sha256"):
        if source.get(key):
            lines.append(f"- {key}: `{source[key]}`")
    if config.get("num_hidden_layers") is not None:
        lines.append(f"- layers in this checkpoint: {config['num_hidden_layers']}")
    lines += ["", "## Method", ""]
    if method:
        lines.append(f"- method: `{method.get('name')}` ({_settings_line(method)})")
    if plan_line:
        lines.append(f"- plan: {plan_line} (every new layer and the original layers it stands for: `plan.json`)")
    if recovery:
        lines.append(f"- recovery: `{recovery.get('name')}` ({_settings_line(recovery)})")
    lines += ["", "## Metrics", ""]
    lines += [f"- {m}" for m in metrics] or ["- none recorded with this checkpoint"]
    lines += ["", "## How to load", ""]
    lines += load_lines if load_lines is not None else _how_to_load(folder, path_hint)
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, **card: Any) -> None:
    """Write :func:`model_card` as ``folder/README.md`` (atomically)."""
    text = model_card(folder, **card)
    with atomic_file(Path(folder) / CARD_FILE) as handle:
        handle.write(text)
