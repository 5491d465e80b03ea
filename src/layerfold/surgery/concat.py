"""CoMe's concatenation merge: one new layer built from the best heads and channels of adjacent layers.

For a window of layers ``k = 1..m`` with shares ``r_k`` (summing to 1), the new layer keeps
``n_k`` key-value heads and ``c_k`` FFN channels of layer ``k`` (``distribute`` of the totals by
``r``), chosen by sensitivity, and concatenates them, so it has exactly an original layer's shapes:

- query rows of the kept key-value heads' query heads, key and value rows of the kept heads (Qwen2 and
  OPT q/k/v biases follow their rows; Phi-3's fused ``qkv_proj`` keeps them block by block, and OLMo 2's
  whole-projection ``q_norm``/``k_norm`` weights follow the same rows), the matching ``o_proj`` columns;
- FFN input rows (``gate``/``up``, Phi-3's fused ``gate_up_proj`` block by block, or ``fc1`` and its bias)
  and ``down``/``fc2`` columns of the kept channels;
- output biases (``o_proj``/``out_proj``, ``down``/``fc2``) as ``sum_k r_k b_k``;
- layer norms as the plain mean of the window's (``norms="mean"``, the released code) or as
  ``sum_k r_k w_k`` (``norms="weighted"``), Gemma's four sandwich norms alike (a post-norm then normalises
  the window's branch outputs together); Qwen3's and Gemma 3's per-head ``q_norm``/``k_norm`` always
  ratio-weighted, as the code.

Mixture-of-experts layers, multi-head latent attention and families without a curated adapter are refused
(:func:`concat_refusal`: why, in the message), from the structure alone, so ``validate`` refuses them too.

Every head and channel of layer ``k`` then reads the *window's input* instead of its own layer's: the
new layer runs the window's pieces in parallel, not in sequence.

**Grouped-query attention.** Query head ``h`` attends with key-value head ``h // n_rep`` (HF's
``repeat_kv``). ``heads="grouped"`` (default) keeps each kept key-value head together with its own
``n_rep`` query heads. ``heads="tiled"`` reproduces the released code (``mask.repeat(n_rep)`` over the
key-value mask), which keeps the query heads ``h`` with ``h mod num_kv`` among the kept heads and so
pairs query heads with the wrong key-value heads whenever ``n_rep > 1``; with ``n_rep = 1`` both
modes are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from layerfold.models.adapters import LayerAdapter, UnsupportedArchitectureError, get_adapter

HEAD_MODES = ("grouped", "tiled")
NORM_MODES = ("mean", "weighted")


# What a block of rows of a projection is made of: heads of the query or of the keys/values (``head_dim``
# rows each); any other part ("gate", "up", "channel") is FFN channels (one row each).
HEAD_PARTS = ("query", "key", "value")


@dataclass(frozen=True)
class ConcatLayout:
    """Where a decoder layer keeps what the concatenation merge splits, and its head/channel counts.

    ``rows`` lists every module whose output rows are blocks of heads or channels, with its blocks in row
    order: ``("self_attn.q_proj", ("query",))`` for a separate projection, ``("self_attn.qkv_proj", ("query",
    "key", "value"))`` for Phi-3's fused one, ``("mlp.gate_up_proj", ("gate", "up"))``, and OLMo 2's
    ``q_norm``/``k_norm``, whose weights run over the whole projection and so follow the heads' rows too.
    """

    query: str
    key: str
    value: str
    attn_output: str
    mlp_inputs: tuple[str, ...]  # rows = intermediate channels (gate, up / fc1)
    mlp_output: str  # columns = intermediate channels (down / fc2)
    norms: tuple[str, ...]  # layer norms (averaged)
    head_norms: tuple[str, ...]  # per-head norms inside attention (ratio-weighted)
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    rows: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    def block_rows(self, part: str) -> int:
        """Rows of one block of ``part`` in a projection."""
        if part == "query":
            return self.num_heads * self.head_dim
        if part in HEAD_PARTS:
            return self.num_kv_heads * self.head_dim
        return self.intermediate

    def parameter_names(self, layer: nn.Module) -> set[str]:
        """Every ``state_dict`` entry the merge writes for ``layer``."""
        names = set()
        modules = (*(m for m, _ in self.rows), self.attn_output, self.mlp_output, *self.norms, *self.head_norms)
        for module in modules:
            for attr in ("weight", "bias"):
                if getattr(layer.get_submodule(module), attr, None) is not None:
                    names.add(f"{module}.{attr}")
        return names


def _submodule(layer: nn.Module, name: str, role: str, family: str) -> nn.Module:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        raise UnsupportedArchitectureError(
            f"CoMe's concatenation merge needs {role} '{name}' in every decoder layer, and this {family} model's "
            "layer has none. Use a model with a standard attention + MLP block, or fix the adapter in "
            "layerfold/models/adapters.py."
        ) from None


def concat_refusal(adapter: LayerAdapter, layers: Sequence[nn.Module] | None) -> str | None:
    """Why the layers of this family cannot be concatenation-merged at all, or None (decided from the structure only).

    ``layers`` None (not known, e.g. from a GGUF header): a family with routed experts is taken to use them.
    """
    family = adapter.family
    if adapter.generic:
        return (f"CoMe's concatenation merge needs to know which rows of which projections are attention heads and FFN channels; "
                f"'{family}' has no curated adapter (layerfold found its layers from the model), so it cannot split them. "
                "Add a LayerAdapter entry in layerfold/models/adapters.py, or use a removal or weight-merge method.")
    if adapter.latent_attention:
        return (f"CoMe's concatenation merge keeps whole attention heads of two layers side by side; '{family}' uses multi-head "
                "latent attention, whose keys and values of all heads come from one shared latent projection "
                "(kv_a_proj_with_mqa), so heads of two layers cannot share one layer's latent. Use a removal or weight-merge method.")
    if adapter.experts and (layers is None or any(has_module(layer, adapter.experts) for layer in layers)):
        return (f"CoMe's concatenation merge concatenates the FFN channels of two layers into one FFN that reads the window's "
                f"input; '{family}' routes its FFN through a mixture of experts, and one layer's router cannot route tokens to "
                "the experts of two layers (expert e of one layer and expert e of another are unrelated), so channel sensitivity "
                "and concatenation are not defined for routed experts. Use a removal method or a weight merge (LaCo, MKA), "
                "which merge experts expert by expert.")
    if adapter.head_projections is None and not adapter.head_rows:
        return (f"CoMe's concatenation merge needs separate query/key/value projections (or a fused one whose rows are "
                f"query, key and value blocks in turn); '{family}' fuses them per head ({', '.join(adapter.attn_linears[:-1])}). "
                "Supported: every family with an adapter that names its head rows (docs/architectures.md).")
    if not adapter.mlp_output or len(adapter.mlp_linears) < 2:
        return f"The '{family}' adapter names no MLP intermediate projection; CoMe merges FFN channels."
    return None


def has_module(layer: nn.Module, name: str) -> bool:
    """Whether ``layer`` has the submodule ``name`` (some layers of a stack lack some: dense vs MoE)."""
    try:
        layer.get_submodule(name)
        return True
    except AttributeError:
        return False


def concat_layout(model: PreTrainedModel) -> ConcatLayout:
    """Check that the model's layers can be concatenation-merged and describe them; raises before any work.

    Works on a model whose tensors are on the meta device (shapes only), so ``validate`` can ask it of a config.
    """
    adapter: LayerAdapter = get_adapter(model)
    family = adapter.family
    layers = adapter.get_layers(model)
    why = concat_refusal(adapter, layers)
    if why is not None:
        raise UnsupportedArchitectureError(why)
    layer = layers[0]
    if adapter.head_projections is not None:
        q_name, k_name, v_name = adapter.head_projections
        head_rows = tuple((name, (part,)) for name, part in zip(adapter.head_projections, ("query", "key", "value")))
    else:
        q_name = k_name = v_name = adapter.head_rows[0][0]
        head_rows = ()
    head_rows = head_rows + tuple(adapter.head_rows)
    mlp_inputs = tuple(n for n in adapter.mlp_linears if n != adapter.mlp_output and has_module(layer, n))
    fused_channels = dict(adapter.channel_rows)
    channel_rows = tuple((name, fused_channels.get(name, ("channel",))) for name in mlp_inputs)
    for name, _ in head_rows:
        _submodule(layer, name, "the query/key/value projection", family)
    _submodule(layer, adapter.attn_output, "the attention output projection", family)
    down = _submodule(layer, adapter.mlp_output, "an MLP intermediate (output) projection", family)
    for name in mlp_inputs:
        _submodule(layer, name, "the MLP input projection", family)
    for name in adapter.norms:
        _submodule(layer, name, "the normalisation", family)

    config = model.config
    attention = layer.get_submodule(adapter.attention)
    num_heads = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // num_heads
    layout = ConcatLayout(
        query=q_name, key=k_name, value=v_name, attn_output=adapter.attn_output,
        mlp_inputs=mlp_inputs, mlp_output=adapter.mlp_output,
        norms=tuple(n for n in adapter.norms if n not in adapter.head_norms and n not in dict(head_rows)),
        head_norms=adapter.head_norms, head_dim=int(head_dim), num_heads=num_heads, num_kv_heads=num_kv,
        intermediate=down.in_features, rows=head_rows + channel_rows,
    )
    for name, parts in layout.rows:
        rows = layer.get_submodule(name).weight.shape[0]
        if rows != sum(layout.block_rows(p) for p in parts) or num_heads % num_kv:
            raise UnsupportedArchitectureError(
                f"Cannot split '{name}' of this {family} model into {'/'.join(parts)} blocks: {rows} rows, {num_heads} query and "
                f"{num_kv} key-value heads of head_dim {head_dim}, intermediate {layout.intermediate}."
            )
    if layer.get_submodule(adapter.attn_output).weight.shape[1] != layout.block_rows("query"):
        raise UnsupportedArchitectureError(f"The attention output projection of this {family} model does not read {num_heads} heads of {head_dim}.")
    unhandled = set(layer.state_dict()) - layout.parameter_names(layer)
    if unhandled:
        raise UnsupportedArchitectureError(
            f"The concatenation merge does not know how to combine {sorted(unhandled)} of a {family} layer; "
            "name them in the adapter (layerfold/models/adapters.py) or use another method."
        )
    return layout


def query_heads(kept_kv: Sequence[int], num_heads: int, num_kv_heads: int, mode: str = "grouped") -> list[int]:
    """Query heads kept with the key-value heads ``kept_kv``, ascending.

    ``grouped``: the heads that attend with them (``h // n_rep`` in ``kept_kv``). ``tiled``: the
    released code's ``mask.repeat(n_rep)`` selection (``h mod num_kv`` in ``kept_kv``).
    """
    if mode not in HEAD_MODES:
        raise ValueError(f"heads must be one of {HEAD_MODES}, got {mode!r}.")
    n_rep = num_heads // num_kv_heads
    kept = set(kept_kv)
    owner = (lambda h: h // n_rep) if mode == "grouped" else (lambda h: h % num_kv_heads)
    return [h for h in range(num_heads) if owner(h) in kept]


def _rows(heads: Sequence[int], head_dim: int, device: torch.device) -> torch.Tensor:
    """Row indices of ``heads`` in a projection whose rows are per-head blocks of ``head_dim``."""
    index = [h * head_dim + d for h in heads for d in range(head_dim)]
    return torch.tensor(index, dtype=torch.long, device=device)


@dataclass
class ConcatChoice:
    """What a concatenation merge keeps from each layer of the window."""

    ratio: list[float]
    kv_heads: list[list[int]]
    query_heads: list[list[int]]
    channels: list[list[int]]

    def summary(self) -> dict:
        return {
            "ratio": [round(r, 6) for r in self.ratio],
            "kv_heads_kept": self.kv_heads,
            "query_heads_kept": self.query_heads,
            "channels_kept": [len(c) for c in self.channels],
        }


@torch.no_grad()
def concat_merge_state(
    model: PreTrainedModel, layout: ConcatLayout, positions: Sequence[int], choice: ConcatChoice, norms: str = "mean"
) -> dict[str, torch.Tensor]:
    """The full ``state_dict`` of the merged layer for the window ``positions`` (current stack indices).

    Reads the window's layers, writes nothing; the caller loads the result into ``positions[0]``.
    """
    return concat_merge_layers([get_adapter(model).get_layers(model)[p] for p in positions], layout, choice, norms)


@torch.no_grad()
def concat_merge_layers(layers: Sequence[nn.Module], layout: ConcatLayout, choice: ConcatChoice, norms: str = "mean") -> dict[str, torch.Tensor]:
    """:func:`concat_merge_state` of the window's layers themselves (modules, or anything whose
    ``get_submodule(name)`` has the module's ``weight`` / ``bias``: a layer built from its state dict)."""
    if norms not in NORM_MODES:
        raise ValueError(f"norms must be one of {NORM_MODES}, got {norms!r}.")
    ratio = choice.ratio
    state: dict[str, torch.Tensor] = {}

    def param(layer: nn.Module, module: str, attr: str) -> torch.Tensor | None:
        return getattr(layer.get_submodule(module), attr, None)

    def concat(module: str, attr: str, index: list[torch.Tensor], dim: int) -> None:
        parts = [param(layer, module, attr).index_select(dim, idx) for layer, idx in zip(layers, index)]
        state[f"{module}.{attr}"] = torch.cat(parts, dim=dim)

    def combine(module: str, attr: str, weights: Sequence[float]) -> None:
        first = param(layers[0], module, attr)
        total = torch.zeros_like(first, dtype=torch.float32)
        for layer, w in zip(layers, weights):
            total += w * param(layer, module, attr).float()
        state[f"{module}.{attr}"] = total.to(first.dtype)

    device = param(layers[0], layout.attn_output, "weight").device
    q_rows = [_rows(h, layout.head_dim, device) for h in choice.query_heads]
    kv_rows = [_rows(h, layout.head_dim, device) for h in choice.kv_heads]
    channels = [torch.tensor(c, dtype=torch.long, device=device) for c in choice.channels]
    plain = [1.0 / len(layers)] * len(layers)
    selected = {"query": q_rows, "key": kv_rows, "value": kv_rows}

    for module, parts in layout.rows:
        for attr in ("weight", "bias"):
            if param(layers[0], module, attr) is None:
                continue
            blocks, offset = [], 0
            for part in parts:  # each block of the fused rows takes its kept rows from every layer of the window
                index = [offset + idx for idx in selected.get(part, channels)]
                blocks += [param(layer, module, attr).index_select(0, idx) for layer, idx in zip(layers, index)]
                offset += layout.block_rows(part)
            state[f"{module}.{attr}"] = torch.cat(blocks, dim=0)
    concat(layout.attn_output, "weight", q_rows, 1)
    concat(layout.mlp_output, "weight", channels, 1)
    for module in (layout.attn_output, layout.mlp_output):
        if param(layers[0], module, "bias") is not None:
            combine(module, "bias", ratio)
    for module in layout.norms:
        for attr in ("weight", "bias"):
            if param(layers[0], module, attr) is not None:
                combine(module, attr, plain if norms == "mean" else ratio)
    for module in layout.head_norms:
        combine(module, "weight", ratio)
    return state
