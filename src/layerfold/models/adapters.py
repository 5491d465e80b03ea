"""Architecture adapters: where each model family keeps its decoder layers, norms and projections.

Everything that edits or observes layers goes through an adapter. A curated entry in :data:`ADAPTERS`
names what the surgery needs for head- and channel-level work (CoMe) and for LLM-Streamline's
re-initialised replacements; any other causal LM with a decoder-layer list gets an adapter
*discovered* from the model itself (:func:`discover_adapter`), which is enough for removal, weight
merges of layers of one structure, recovery and layer-by-layer execution. Names are attribute
paths relative to the model (``layers``, ``final_norm``, ``embed``) or to one decoder layer
(everything else). A name an adapter lists may be absent from some layers of a stack that mixes
layer kinds (a dense MLP in DeepSeek's first layers, routed experts above them).

Per-layer *config* entries (``layer_types``, ``no_rope_layers``, ``mlp_only_layers``,
``first_k_dense_replace``, ...) are not the adapter's: they are recognised by name for every family
in :mod:`layerfold.models.layer_config`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# One projection whose output rows are several blocks side by side, in this order: "query"/"key"/"value"
# blocks of heads (``head_dim`` rows per head) or "gate"/"up" blocks of FFN channels (one row each).
RowParts = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class LayerAdapter:
    family: str
    layers: str  # model -> nn.ModuleList of decoder layers
    final_norm: str  # model -> norm applied after the last layer
    embed: str  # model -> token embedding
    attention: str  # layer -> attention module (carries layer_idx for the KV cache)
    mlp: str  # layer -> FFN module (a dense MLP or a mixture-of-experts block); "" when the FFN is not one submodule
    attn_linears: tuple[str, ...]  # layer -> attention projections (input side first, output last)
    # layer -> nn.Linear projections of the FFN (input side first, output last): a dense MLP, or a MoE block's
    # shared experts; routed experts are 3-D parameters (``experts``), not linears
    mlp_linears: tuple[str, ...]
    norms: tuple[str, ...]  # layer -> normalisation modules inside the layer (kept from the base layer by merges)
    attn_output: str  # layer -> projection whose input is the concatenated head outputs
    mlp_output: str  # layer -> projection whose input is the MLP intermediate activation ("" when there is none)
    # layer -> separate query, key, value projections whose output rows are per-head blocks; None when fused
    # (GPT-NeoX's per-head interleaved query_key_value, Phi-3's qkv_proj: see ``head_rows``) or absent (MLA)
    head_projections: tuple[str, str, str] | None = None
    head_norms: tuple[str, ...] = ()  # layer -> per-head norms inside attention, shared by all heads (Qwen3 q_norm / k_norm)
    # Modules whose rows are blocks of heads, when not the plain q/k/v of ``head_projections``: Phi-3's fused
    # qkv_proj ("query", "key", "value"), OLMo 2's q_norm/k_norm over the whole projection ("query" / "key").
    head_rows: tuple[RowParts, ...] = ()
    channel_rows: tuple[RowParts, ...] = ()  # FFN input modules whose rows are blocks of channels (Phi-3 gate_up_proj)
    ffn_norms: tuple[str, ...] | None = None  # norms of the FFN branch (None: the second of ``norms``, the pre-FFN norm)
    router: str = ""  # layer -> MoE router (a module with a weight, not an nn.Linear LoRA could wrap)
    experts: str = ""  # layer -> routed experts (3-D parameters, expert first)
    latent_attention: bool = False  # multi-head latent attention (DeepSeek): keys/values from one latent shared by all heads
    ffn_output_pair: bool = False  # a MoE layer unpacks its FFN's output as (output, router scores) (Llama 4)
    generic: bool = False  # discovered from the model rather than a curated entry

    @property
    def linears(self) -> tuple[str, ...]:
        """Every nn.Linear projection a layer may hold (LoRA targets)."""
        return self.attn_linears + self.mlp_linears

    @property
    def ffn_branch_norms(self) -> tuple[str, ...]:
        """The norms a freshly initialised FFN gets reset with (pre- and, where the family has one, post-FFN norm)."""
        return self.ffn_norms if self.ffn_norms is not None else self.norms[1:2]

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)

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

    def is_norm_key(self, key: str) -> bool:
        """Whether a layer state-dict key belongs to one of the layer's norms (kept from the base layer by merges)."""
        module = key.rsplit(".", 1)[0]
        return any(module == n or module.startswith(n + ".") for n in self.norms)

    def merged_keys(self, layer: nn.Module | Mapping[str, Any]) -> list[str]:
        """The state-dict keys of ``layer`` a weight merge combines: every floating tensor outside the norms.

        Linear weights and biases, a MoE block's routed experts (3-D, expert first, so an elementwise merge is
        expert by expert) and its router (weight, and DeepSeek-V3's score-correction bias buffer), shared experts.
        """
        state = layer.state_dict() if isinstance(layer, nn.Module) else layer
        return [k for k, v in state.items() if v.is_floating_point() and not self.is_norm_key(k)]


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
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def _llama_like(family: str, **changes: Any) -> LayerAdapter:
    return LayerAdapter(family=family, **{**_LLAMA_LIKE, **changes})


def _moe(family: str, shared: tuple[str, ...] = (), **changes: Any) -> LayerAdapter:
    """A Llama-style attention over a MoE block ``mlp`` (router ``mlp.gate``, experts ``mlp.experts``); the
    dense-MLP names stay for the layers that have one (Qwen-MoE ``mlp_only_layers``, DeepSeek's first layers)."""
    return _llama_like(family, mlp_linears=_LLAMA_LIKE["mlp_linears"] + shared, router="mlp.gate", experts="mlp.experts", **changes)


_MLA_ATTENTION = dict(
    attn_linears=("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                  "self_attn.kv_b_proj", "self_attn.o_proj"),
    norms=("input_layernorm", "post_attention_layernorm", "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm"),
    head_projections=None,
    latent_attention=True,
)
_DEEPSEEK_SHARED = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj")

ADAPTERS: dict[str, LayerAdapter] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3", norms=("input_layernorm", "post_attention_layernorm", *_QK_NORMS), head_norms=_QK_NORMS),
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
    # Sandwich norms: a norm before and after each branch, so the FFN branch has two.
    "gemma2": _llama_like("gemma2", norms=_GEMMA_NORMS, ffn_norms=_GEMMA_NORMS[2:]),
    "gemma3_text": _llama_like("gemma3_text", norms=(*_GEMMA_NORMS, *_QK_NORMS), ffn_norms=_GEMMA_NORMS[2:], head_norms=_QK_NORMS),
    # Fused projections: rows [query heads | key heads | value heads] and [gate | up].
    "phi3": _llama_like(
        "phi3",
        attn_linears=("self_attn.qkv_proj", "self_attn.o_proj"),
        mlp_linears=("mlp.gate_up_proj", "mlp.down_proj"),
        head_projections=None,
        head_rows=(("self_attn.qkv_proj", ("query", "key", "value")),),
        channel_rows=(("mlp.gate_up_proj", ("gate", "up")),),
    ),
    # Post-norms only, and q/k norms over the whole projection (all heads at once), whose weights follow the heads' rows.
    "olmo2": _llama_like(
        "olmo2",
        norms=("post_attention_layernorm", "post_feedforward_layernorm", *_QK_NORMS),
        ffn_norms=("post_feedforward_layernorm",),
        head_rows=(("self_attn.q_norm", ("query",)), ("self_attn.k_norm", ("key",))),
    ),
    "smollm3": _llama_like("smollm3"),  # Llama with no-rope layers (config no_rope_layers)
    "granite": _llama_like("granite"),  # embedding / residual / attention multipliers and logits scaling: config scalars
    "mixtral": _moe("mixtral"),
    "qwen2_moe": _moe("qwen2_moe", shared=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                           "mlp.shared_expert.down_proj", "mlp.shared_expert_gate")),
    "qwen3_moe": _moe("qwen3_moe", norms=("input_layernorm", "post_attention_layernorm", *_QK_NORMS), head_norms=_QK_NORMS),
    "deepseek_v2": _moe("deepseek_v2", shared=_DEEPSEEK_SHARED, **_MLA_ATTENTION),
    "deepseek_v3": _moe("deepseek_v3", shared=_DEEPSEEK_SHARED, **_MLA_ATTENTION),
    # Llama 4 (text): MoE layers (config moe_layers) interleaved with dense ones, no-rope and chunked-attention layers.
    "llama4_text": _llama_like(
        "llama4_text",
        mlp="feed_forward",
        mlp_linears=("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj",
                     "feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj",
                     "feed_forward.shared_expert.down_proj"),
        mlp_output="feed_forward.down_proj",
        router="feed_forward.router",
        experts="feed_forward.experts",
        ffn_output_pair=True,
    ),
}


class UnsupportedArchitectureError(ValueError):
    pass


def get_adapter(source: nn.Module | Any | str) -> LayerAdapter:
    """Adapter of a model, a config (a ``PretrainedConfig`` or a ``config.json`` dict) or a model-type string.

    A curated entry when the model type has one; otherwise the adapter discovered from the model (or, for
    a config, from a model built on the meta device: no memory, no weights). A bare string of a type
    without an entry cannot be discovered and is refused.
    """
    if isinstance(source, str):
        if source in ADAPTERS:
            return ADAPTERS[source]
        raise UnsupportedArchitectureError(
            f"Architecture '{source}' is not supported; supported: {', '.join(sorted(ADAPTERS))}, or any causal LM "
            "with a decoder-layer list given by its config. Add a LayerAdapter entry in layerfold/models/adapters.py "
            "naming its decoder layers, norms and projections."
        )
    if isinstance(source, nn.Module):
        model_type = source.config.model_type
        if model_type in ADAPTERS:
            return ADAPTERS[model_type]
        return _discovered(type(source), lambda: source)
    config = as_config(source)
    if config.model_type in ADAPTERS:
        return ADAPTERS[config.model_type]
    return _discovered_from_config(config)


def as_config(source: Any) -> Any:
    """A ``PretrainedConfig`` from a config or the dict of a ``config.json``."""
    if isinstance(source, Mapping):
        from transformers import CONFIG_MAPPING

        model_type = source.get("model_type")
        try:
            return CONFIG_MAPPING[model_type].from_dict(dict(source))
        except (ValueError, KeyError) as err:
            raise UnsupportedArchitectureError(
                f"Architecture '{model_type}' is not supported: transformers does not know this model type ({err}). "
                "Install a transformers version that ships it, or add a LayerAdapter entry."
            ) from None
    return source


def meta_model(config: Any) -> nn.Module:
    """The causal LM of ``config`` with every tensor on the meta device (names and shapes only)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(config))
    except ValueError as err:
        raise UnsupportedArchitectureError(
            f"Architecture '{config.model_type}' is not supported: transformers cannot build it as a causal LM "
            f"({str(err).splitlines()[0][:200]})."
        ) from None


def _discovered_from_config(config: Any) -> LayerAdapter:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Architecture '{config.model_type}' is not supported: it is not a causal LM transformers can build "
            f"(no AutoModelForCausalLM class); supported: {', '.join(sorted(ADAPTERS))} and causal LMs with a decoder-layer list."
        ) from None
    return _discovered(cls, lambda: meta_model(config))


_DISCOVERED: dict[type, LayerAdapter] = {}


def _discovered(cls: type, build) -> LayerAdapter:
    """The discovered adapter of a model class (the names depend on the class only, so it is found once)."""
    if cls not in _DISCOVERED:
        _DISCOVERED[cls] = discover_adapter(build())
    return _DISCOVERED[cls]


_ATTENTION_WORDS = ("attention", "attn")
_FFN_WORDS = ("mlp", "feedforward", "feed_forward", "moe", "ffn")


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in name


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed linear


def discover_adapter(model: nn.Module) -> LayerAdapter:
    """An adapter found from the model itself: the decoder-layer list, final norm, embedding, norms and linears.

    Raises :class:`UnsupportedArchitectureError` naming what could not be found. The result supports removal,
    merges of layers with one structure, recovery and layer-by-layer execution; head- and channel-level surgery
    and LLM-Streamline's re-initialised replacements need a curated entry (they name the attention output and
    the FFN projections, which cannot be told apart reliably by name).
    """
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = getattr(text, "num_hidden_layers", None)
    where = f"Architecture '{model_type}' ({type(model).__name__})"
    if not depth:
        raise UnsupportedArchitectureError(f"{where}: its config has no num_hidden_layers, so its decoder layers cannot be found.")
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == depth and name]
    if not lists:
        raise UnsupportedArchitectureError(
            f"{where}: found no decoder-layer list (an nn.ModuleList of num_hidden_layers={depth} modules). "
            "Add a LayerAdapter entry in layerfold/models/adapters.py."
        )
    if len(lists) > 1:
        # Prefer a list of "...Layer"/"...Block" modules, then the shallowest path; a tie is ambiguous.
        def rank(item: tuple[str, nn.Module]) -> tuple[bool, int]:
            kind = type(item[1][0]).__name__.lower()
            return (not ("layer" in kind or "block" in kind), item[0].count("."))

        lists = sorted(lists, key=rank)
        if rank(lists[0]) == rank(lists[1]):
            raise UnsupportedArchitectureError(
                f"{where}: several module lists of {depth} modules could be the decoder layers "
                f"({', '.join(name for name, _ in lists)}). Add a LayerAdapter entry naming them."
            )
    layers_name, layers = lists[0]
    parent_name = layers_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    embedding = model.get_input_embeddings()
    embed = next((name for name, module in model.named_modules() if module is embedding), None)
    if embed is None:
        raise UnsupportedArchitectureError(f"{where}: get_input_embeddings() is not a submodule of the model; cannot name the embedding.")
    finals = [name for name, child in parent.named_children() if _is_norm(child)]
    if not finals:
        raise UnsupportedArchitectureError(
            f"{where}: found no final norm beside the decoder layers in '{parent_name or 'the model'}' (a child whose class is a "
            "norm). Add a LayerAdapter entry naming it."
        )
    final_norm = f"{parent_name}.{finals[-1]}" if parent_name else finals[-1]
    layer = layers[0]
    children = dict(layer.named_children())
    attention = next((n for n, c in children.items() if any(w in type(c).__name__.lower() or w in n.lower() for w in _ATTENTION_WORDS)), "")
    mlp = next((n for n, c in children.items() if any(w in type(c).__name__.lower() or w in n.lower() for w in _FFN_WORDS)), "")
    norms = tuple(n for n, c in layer.named_modules() if n and _is_norm(c) and list(c.parameters(recurse=False)))
    norms = tuple(n for n in norms if not any(n.startswith(o + ".") for o in norms))
    linear_names = {n for layer_ in layers for n, c in layer_.named_modules() if _is_linear(c)}
    attn = tuple(sorted(n for n in linear_names if attention and n.startswith(attention + ".")))
    ffn = tuple(sorted(n for n in linear_names if n not in attn))
    return LayerAdapter(
        family=model_type, layers=layers_name, final_norm=final_norm, embed=embed, attention=attention, mlp=mlp,
        attn_linears=attn, mlp_linears=ffn, norms=norms, attn_output="", mlp_output="", generic=True,
    )


def final_representation(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the model's final norm (what ``hidden_states[-1]`` holds in HF)."""
    return model.get_submodule(get_adapter(model).final_norm)(hidden)


class LogitsHead(nn.Module):
    """The LM head with the family's transform of the logits, as the model's own forward applies it after the head.

    ``scale`` multiplies (Cohere's ``logit_scale``), ``divide`` divides (Granite's ``logits_scaling``) and
    ``softcap`` caps ``cap * tanh(logits / cap)`` (Gemma 2/3's ``final_logit_softcapping``).
    """

    def __init__(self, head: nn.Module, scale: float | None = None, divide: float | None = None, softcap: float | None = None) -> None:
        super().__init__()
        self.head = head
        self.scale, self.divide, self.softcap = scale, divide, softcap

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logits_head(model: nn.Module) -> nn.Module:
    """The module that turns final-norm hidden states into the logits the model's forward returns.

    The output embedding itself for most families; wrapped in a :class:`LogitsHead` when the config scales or
    soft-caps the logits (so next-token losses computed outside the model's forward, layer by layer, match it).
    """
    head = model.get_output_embeddings()
    config = model.config
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = float(scale) if isinstance(scale, (int, float)) and scale != 1 else None
    divide = float(divide) if isinstance(divide, (int, float)) and divide != 1 else None
    softcap = float(softcap) if isinstance(softcap, (int, float)) and softcap else None
    if scale is None and divide is None and softcap is None:
        return head
    return LogitsHead(head, scale, divide, softcap)
