"""Architecture adapters: where each model family keeps its decoder layers, norms and projections.

Everything that edits or observes layers goes through an adapter, so supporting a new family is one
entry in :data:`ADAPTERS`. Names are attribute paths relative to the model (``layers``, ``final_norm``)
or to one decoder layer (everything else).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class LayerAdapter:
    family: str
    layers: str  # model -> nn.ModuleList of decoder layers
    final_norm: str  # model -> norm applied after the last layer
    embed: str  # model -> token embedding
    attention: str  # layer -> attention module (carries layer_idx for the KV cache)
    mlp: str  # layer -> MLP module
    attn_linears: tuple[str, ...]  # layer -> attention projections (input side first, output last)
    mlp_linears: tuple[str, ...]  # layer -> MLP projections (input side first, output last)
    norms: tuple[str, ...]  # layer -> normalisation modules inside the layer
    attn_output: str  # layer -> projection whose input is the concatenated head outputs
    mlp_output: str  # layer -> projection whose input is the MLP intermediate activation
    per_layer_config: tuple[str, ...] = field(default=("layer_types",))  # config lists indexed by layer
    # layer -> separate query, key, value projections whose output rows are per-head blocks; None when
    # fused (GPT-NeoX), which head-level surgery such as CoMe's concatenation merge cannot split
    head_projections: tuple[str, str, str] | None = None
    head_norms: tuple[str, ...] = ()  # layer -> per-head norms inside attention (Qwen3 q_norm / k_norm)

    @property
    def linears(self) -> tuple[str, ...]:
        return self.attn_linears + self.mlp_linears

    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent_name, _, child = self.layers.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.get_layers(model))

    def non_embedding_parameters(self, model: nn.Module) -> int:
        """Parameters outside the token embedding and the LM head (a tied head counts once, as embedding)."""
        skip = {id(p) for p in model.get_submodule(self.embed).parameters()}
        head = model.get_output_embeddings()
        if head is not None:
            skip |= {id(p) for p in head.parameters()}
        return sum(p.numel() for p in model.parameters() if id(p) not in skip)


_LLAMA_LIKE = dict(
    layers="model.layers",
    final_norm="model.norm",
    embed="model.embed_tokens",
    attention="self_attn",
    mlp="mlp",
    attn_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp_linears=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
    attn_output="self_attn.o_proj",
    mlp_output="mlp.down_proj",
    head_projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)

ADAPTERS: dict[str, LayerAdapter] = {
    "llama": LayerAdapter(family="llama", **_LLAMA_LIKE),
    "mistral": LayerAdapter(family="mistral", **_LLAMA_LIKE),
    "qwen2": LayerAdapter(family="qwen2", **_LLAMA_LIKE),
    "qwen3": LayerAdapter(
        family="qwen3",
        **{
            **_LLAMA_LIKE,
            "norms": ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"),
            "head_norms": ("self_attn.q_norm", "self_attn.k_norm"),
        },
    ),
    "opt": LayerAdapter(
        family="opt",
        layers="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        embed="model.decoder.embed_tokens",
        attention="self_attn",
        mlp="",  # OPT's MLP is fc1/fc2 directly on the layer
        attn_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        mlp_linears=("fc1", "fc2"),
        norms=("self_attn_layer_norm", "final_layer_norm"),
        attn_output="self_attn.out_proj",
        mlp_output="fc2",
        head_projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    "gpt_neox": LayerAdapter(
        family="gpt_neox",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
        attention="attention",
        mlp="mlp",
        attn_linears=("attention.query_key_value", "attention.dense"),
        mlp_linears=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        norms=("input_layernorm", "post_attention_layernorm"),
        attn_output="attention.dense",
        mlp_output="mlp.dense_4h_to_h",
    ),
}


class UnsupportedArchitectureError(ValueError):
    pass


def get_adapter(model_or_type: nn.Module | str) -> LayerAdapter:
    """Adapter for a model (by ``config.model_type``) or a model-type string."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Architecture '{model_type}' is not supported; supported: {', '.join(sorted(ADAPTERS))}. "
            "Add a LayerAdapter entry in layerfold/models/adapters.py naming its decoder layers, norms and projections."
        ) from None


def final_representation(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the model's final norm (what ``hidden_states[-1]`` holds in HF)."""
    return model.get_submodule(get_adapter(model).final_norm)(hidden)
