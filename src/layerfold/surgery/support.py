"""Which edits a model family supports, decided from its config alone, and the reason when it does not.

``validate`` builds the model of the config on the meta device (names and shapes, no memory) and asks
:func:`layerfold.methods.family_refusal` / :func:`recovery_refusal` before anything is loaded. The reasons are the
surgery's own: the methods call the same functions (:func:`replacement_refusal`,
:func:`~layerfold.surgery.concat.concat_refusal`, :func:`~layerfold.surgery.merge.mergeable`) at run
time, so a method that ``validate`` let start never stops half-way on its model family.

What is decided here, per family (each method declares which of these its edit needs, as
``MethodCapabilities.family_refusal`` in its own file; :func:`layerfold.methods.family_refusal` asks):

- **removal** (every method removes layers): always, for a curated family; for a family whose adapter is
  discovered, the layers must all be built alike, or the config's entries about them must be ones
  layerfold re-writes (:mod:`layerfold.models.layer_config`); this is checked by re-building the layers
  from a trimmed config.
- **weight merges**: only layers of one structure merge; a stack that mixes dense and MoE layers must have
  enough adjacent layers of one kind for the requested merges (:func:`structure_runs`).
- **concatenation**: :func:`concat_family_refusal` (:func:`~layerfold.surgery.concat.concat_refusal`).
- **replacing a layer's parts by new ones**: :func:`replacement_refusal`.
- **LoRA**: the layers need nn.Linear projections.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from layerfold.models import layer_config
from layerfold.models.adapters import LayerAdapter, as_config, get_adapter, meta_model
from layerfold.surgery.concat import concat_refusal, has_module
from layerfold.surgery.merge import layer_structure


@dataclass(frozen=True)
class Family:
    """A model family as the checks see it: its adapter and, when a config is known, the layers it builds (meta)."""

    model_type: str
    adapter: LayerAdapter
    config: Any | None = None  # PretrainedConfig
    layers: tuple[nn.Module, ...] | None = None  # meta decoder layers of the config

    @property
    def structures(self) -> list[int] | None:
        """Per layer, the index of its structure (first layer of that structure): layers with one index merge elementwise."""
        if self.layers is None:
            return None
        seen: dict[tuple, int] = {}
        return [seen.setdefault(layer_structure(layer), i) for i, layer in enumerate(self.layers)]


def family_of(model_type: str, config: Mapping[str, Any] | None) -> Family:
    """The :class:`Family` of a model type and (optionally) its ``config.json`` content; unknown types without a config are refused."""
    if config is None:
        return Family(model_type, get_adapter(model_type))
    return _family_from_config(json.dumps(dict(config), sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _family_from_config(config_json: str) -> Family:
    config = as_config(json.loads(config_json))
    get_adapter(config)  # an architecture that is not a causal LM is refused here, by name
    skeleton = meta_model(config)
    adapter = get_adapter(skeleton)
    return Family(config.model_type, adapter, config, tuple(adapter.get_layers(skeleton)))


def family_of_model(model: nn.Module) -> Family:
    """The :class:`Family` of a model in memory (its own layers stand for the config's)."""
    adapter = get_adapter(model)
    return Family(model.config.model_type, adapter, model.config, tuple(adapter.get_layers(model)))


# ---------------------------------------------------------------------------------------------------
def removal_refusal(family: Family) -> str | None:
    """Why layers of this family cannot be removed with a config that still describes the rest, or None."""
    if not family.adapter.generic or family.layers is None:
        return None  # curated families: their config entries are layerfold.models.layer_config's (tests check each)
    layers = list(family.layers)
    signatures = {layer_config.layer_signature(layer) for layer in layers}
    if len(signatures) == 1 or len(layers) < 2:
        return None  # every layer is built alike: any subset is described by the same config
    for removed in sorted({0, len(layers) // 2}):
        keep = [i for i in range(len(layers)) if i != removed]
        try:
            problems = layer_config.layer_mismatches([layers[i] for i in keep], layer_config.trimmed(family.config, keep))
        except layer_config.LayerConfigError as err:
            problems = [str(err)]
        if problems:
            return (f"The decoder layers of this {family.model_type} model are not all built alike, and after removing layer {removed} "
                    f"its config would no longer describe the rest ({'; '.join(problems[:2])}): the difference is encoded in config "
                    "entries layerfold does not know how to re-write. Add them to layerfold/models/layer_config.py (or a curated "
                    "adapter) before removing layers of this family.")
    return None


def structure_runs(structures: Sequence[int], lo: int = 0, hi: int | None = None) -> list[int]:
    """Lengths of the maximal runs of adjacent layers of one structure among layers ``lo..hi`` (only such layers merge)."""
    part = list(structures[lo : (len(structures) if hi is None else hi + 1)])
    runs, length = [], 0
    for i, s in enumerate(part):
        length = length + 1 if i and s == part[i - 1] else 1
        if i + 1 == len(part) or part[i + 1] != s:
            runs.append(length)
    return runs


def structure_kinds(family: Family) -> str:
    """Which layers are built alike, in words (``layers 0-3,5 alike; layers 4 alike``), for a refusal."""
    structures = family.structures or []
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(structures):
        groups.setdefault(s, []).append(i)
    return "; ".join(f"layers {_ranges(g)} alike" for g in groups.values())


def _ranges(indices: list[int]) -> str:
    parts, start = [], indices[0]
    for a, b in zip(indices, indices[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def concat_family_refusal(family: Family, cfg: Any = None) -> str | None:
    """Why windows of this family's layers cannot be concatenated into one layer (CoMe's edit), or None."""
    return concat_refusal(family.adapter, family.layers)


def _activation(config: Any) -> str | None:
    for key in ("hidden_act", "hidden_activation", "activation_function"):
        value = getattr(config, key, None)
        if isinstance(value, str):
            return value
    return None


def replacement_refusal(family: Family, replacement: str) -> str | None:
    """Why LLM-Streamline's ``replacement`` cannot be expressed in this family's layers, or None."""
    adapter, model_type = family.adapter, family.model_type
    if replacement in ("none", "transformer_layer"):
        return None
    if adapter.generic:
        return (f"method.replacement={replacement} re-initialises parts of a decoder layer (its attention output, its FFN), which "
                f"layerfold can only name for a family with a curated adapter; '{model_type}' has none (its layers were found "
                "from the model). Use method.replacement=transformer_layer or none.")
    layers = family.layers or ()
    moe = bool(adapter.experts) and (not layers or any(has_module(layer, adapter.experts) for layer in layers))
    if replacement == "swiglu":
        gated = any("gate" in name for name in adapter.mlp_linears) or bool(adapter.channel_rows)
        act = _activation(family.config) if family.config is not None else "silu"
        if moe or not gated or act not in ("silu", "swish"):
            what = ("a mixture of experts" if moe else f"{act}-gated" if gated else "ungated")
            return (f"method.replacement=swiglu needs a SwiGLU FFN, which '{model_type}' does not have (its FFN is {what}); "
                    "use replacement=ffn for this architecture's own FFN.")
    if replacement == "mlp":
        if not adapter.mlp:
            return (f"method.replacement=mlp needs the MLP to be a submodule of the decoder layer, which '{model_type}' "
                    "does not have; use replacement=ffn (its own FFN is already a ReLU MLP).")
        if moe and adapter.ffn_output_pair:
            return (f"method.replacement=mlp puts a ReLU MLP where the layer's FFN was, but a '{model_type}' mixture-of-experts layer "
                    "unpacks its FFN's output as an (output, router scores) pair, which a plain MLP does not return; use "
                    "replacement=ffn or transformer_layer.")
    return None


def recovery_refusal(family: Family, recovery: Mapping[str, Any] | None) -> str | None:
    """Why the configured recovery cannot run on this family, or None."""
    if recovery is None:
        return None
    lora = recovery.get("lora") or {}
    if lora.get("enabled") and not family.adapter.linears:
        return (f"recovery.lora.enabled=true adapts the nn.Linear projections of the trained layers, and layerfold found none in "
                f"'{family.model_type}' layers; set recovery.lora.enabled=false.")
    return None
