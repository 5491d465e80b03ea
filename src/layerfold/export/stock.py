"""Is a checkpoint a stock transformers checkpoint, and does its config read the way serving engines read it?

Serving engines (vLLM, llama.cpp's converter, TGI) build a model from ``config.json`` alone, one layer class
repeated ``num_hidden_layers`` times with the head counts and FFN width the config states, and then load
the weights into it: a per-layer list shorter or longer than the stack, or a layer whose projections have
another shape than the config implies, fails there (or, worse, loads into the wrong layer). Both checks
read only ``config.json`` and the safetensors headers, never the weights, so they run in a second.

:func:`checkpoint_kind` is the machine-readable answer a model card or an export reads: ``"stock"``, or
``"custom: <reason>"`` naming what a stock loader would miss.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open

from layerfold.models.adapters import ADAPTERS
from layerfold.models.layer_config import VALUE_LISTS
from layerfold.models.replacement import SIDE_FILE
from layerfold.models.sources import resolve_pointer

STOCK = "stock"
CUSTOM_PREFIX = "custom: "
# Settings a config may give either once for every layer or as a list with one entry per layer.
PER_LAYER_OR_UNIFORM = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def checkpoint_kind(checkpoint_dir: str | Path) -> str:
    """``"stock"`` when plain ``AutoModelForCausalLM.from_pretrained`` (and a serving engine reading the config)
    loads the whole model, else ``"custom: <reasons>"``. A ``pointer.json`` directory (recovery=none) is followed."""
    reasons = custom_reasons(checkpoint_dir)
    return STOCK if not reasons else CUSTOM_PREFIX + "; ".join(reasons)


def custom_reasons(checkpoint_dir: str | Path) -> list[str]:
    """Why the checkpoint is not stock (empty when it is)."""
    directory = resolve_pointer(checkpoint_dir)
    config = json.loads((directory / "config.json").read_text())
    reasons = []
    if (directory / SIDE_FILE).exists():
        reasons.append(
            f"{SIDE_FILE} holds replacement layers no stock layer class can express (LLM-Streamline's mlp replacement); "
            "plain from_pretrained and serving engines load the model without them, i.e. a different model"
        )
    if config.get("auto_map"):
        reasons.append(f"config.json's auto_map ({', '.join(sorted(config['auto_map']))}) needs custom modeling code (trust_remote_code)")
    reasons += serving_config_problems(config, tensor_shapes(directory))
    return reasons


def tensor_shapes(checkpoint_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a checkpoint's safetensors files, read from their headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        if file.name == SIDE_FILE:
            continue
        with safe_open(str(file), "np") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def serving_config_problems(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[str]:
    """What a loader that builds the model from ``config`` would trip over (empty when nothing).

    - every known per-layer list (:data:`layerfold.models.layer_config.VALUE_LISTS`, e.g. ``layer_types``) has one
      entry per layer;
    - head counts and FFN width are one number for all layers, or a list with one entry per layer ("declared");
    - the query heads are a multiple of the key-value heads;
    - with ``shapes`` (:func:`tensor_shapes`): the weights hold exactly the layers ``0 .. num_hidden_layers - 1``,
      and every layer's projections have the shapes the config states for that layer (Llama-like families).
    """
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        return [f"config.json's num_hidden_layers={layers!r} is not a positive integer"]
    adapter = ADAPTERS.get(config.get("model_type", ""))
    problems = []
    for key in VALUE_LISTS:
        value = config.get(key)
        if isinstance(value, list) and len(value) != layers:
            problems.append(f"config.json's {key} has {len(value)} entries for {layers} layers (num_hidden_layers)")
    per_layer: dict[str, list[Any]] = {}
    for key in PER_LAYER_OR_UNIFORM:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            if len(value) != layers:
                problems.append(f"config.json's {key} is a list of {len(value)} entries for {layers} layers; give one number "
                                "for all layers or one entry per layer")
                continue
            per_layer[key] = value
        elif isinstance(value, int):
            per_layer[key] = [value] * layers
        else:
            problems.append(f"config.json's {key}={value!r} is neither a number nor a per-layer list")
    heads, kv_heads = per_layer.get("num_attention_heads"), per_layer.get("num_key_value_heads")
    if heads and kv_heads:
        for i, (q, kv) in enumerate(zip(heads, kv_heads)):
            if kv < 1 or q % kv:
                problems.append(f"layer {i}: {q} query heads are not a multiple of {kv} key-value heads")
                break
    if shapes is not None and adapter is not None:
        problems += _weight_problems(config, adapter, layers, per_layer, shapes)
    return problems


def _weight_problems(config: Mapping[str, Any], adapter, layers: int, per_layer: dict[str, list[Any]],
                     shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Layer indices present in the weights, and (Llama-like families) each layer's projection shapes."""
    prefix = re.escape(adapter.layers) + r"\.(\d+)\."
    present = sorted({int(m.group(1)) for name in shapes if (m := re.match(prefix, name))})
    if present != list(range(layers)):
        missing = sorted(set(range(layers)) - set(present))
        extra = sorted(set(present) - set(range(layers)))
        return [f"the weights hold layers {_span(present)} but num_hidden_layers={layers}"
                + (f" (missing {missing})" if missing else "") + (f" (beyond the config: {extra})" if extra else "")]
    if adapter.head_projections is None or len(adapter.mlp_linears) != 3 or not {"num_attention_heads", "intermediate_size"} <= set(per_layer):
        return []  # only Llama-like layouts (separate q/k/v, gate/up/down) are checked projection by projection
    hidden = config["hidden_size"]
    q_name, k_name, v_name = adapter.head_projections
    gate, up, down = adapter.mlp_linears
    problems = []
    for i in range(layers):
        heads = per_layer["num_attention_heads"][i]
        kv_heads = per_layer.get("num_key_value_heads", per_layer["num_attention_heads"])[i]
        head_dim = config.get("head_dim") or hidden // heads
        ffn = per_layer["intermediate_size"][i]
        expected = {
            q_name: (heads * head_dim, hidden), k_name: (kv_heads * head_dim, hidden), v_name: (kv_heads * head_dim, hidden),
            adapter.attn_output: (hidden, heads * head_dim), gate: (ffn, hidden), up: (ffn, hidden), down: (hidden, ffn),
        }
        for module, shape in expected.items():
            name = f"{adapter.layers}.{i}.{module}.weight"
            if name in shapes and tuple(shapes[name]) != shape:
                problems.append(f"layer {i}: {module}.weight is {list(shapes[name])}, but the config states {list(shape)} "
                                f"({heads} heads x {head_dim}, {kv_heads} key-value heads, FFN {ffn})")
    return problems


def _span(indices: list[int]) -> str:
    return "none" if not indices else f"{indices[0]}..{indices[-1]} ({len(indices)})"
