"""Tiny random configs of every model family layerfold is tested on (hidden 32, 4 layers, few experts).

Used by the tests and by ``scripts/family_matrix.py``, which runs every method on each of them and writes
the table of ``docs/architectures.md``. Each config turns on what makes its family different from Llama:
alternating sliding-window layers, soft-capping and sandwich norms (Gemma 2/3), fused projections (Phi-3),
post-norms and whole-projection q/k norms (OLMo 2), no-rope layers (SmolLM3, Llama 4), multipliers and
logits scaling (Granite), routed and shared experts, dense first layers and latent attention (Mixtral,
Qwen-MoE, DeepSeek-V2/V3, Llama 4); ``gpt2`` and ``cohere`` have no curated adapter and run on the one
discovered from the model. Sizes are chosen for CPU tests (seconds per family), not for realism.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

VOCAB = 128


def _config(model_type: str, **values: Any) -> PretrainedConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(model_type, **{**base, **values})


_SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

TINY_FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: _config("llama"),
    "mistral": lambda: _config("mistral", sliding_window=None),
    "qwen2": lambda: _config("qwen2"),
    "qwen3": lambda: _config("qwen3", head_dim=8),
    "opt": lambda: _config("opt", num_key_value_heads=None, intermediate_size=None, ffn_dim=64, word_embed_proj_dim=32),
    "gpt_neox": lambda: _config("gpt_neox", num_key_value_heads=None),
    "gemma2": lambda: _config("gemma2", head_dim=8, query_pre_attn_scalar=8, sliding_window=4, layer_types=_SLIDING,
                              final_logit_softcapping=5.0, attn_logit_softcapping=10.0),
    "gemma3_text": lambda: _config("gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=4, layer_types=_SLIDING,
                                   final_logit_softcapping=5.0),
    "phi3": lambda: _config("phi3", original_max_position_embeddings=2048, sliding_window=None),
    "olmo2": lambda: _config("olmo2"),
    "smollm3": lambda: _config("smollm3", no_rope_layer_interval=2),
    "granite": lambda: _config("granite", embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.25,
                               logits_scaling=2.0),
    "mixtral": lambda: _config("mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": lambda: _config("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=32, mlp_only_layers=[0]),
    "qwen3_moe": lambda: _config("qwen3_moe", head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "deepseek_v2": lambda: _config("deepseek_v2", num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4,
                                   qk_nope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1),
    "deepseek_v3": lambda: _config("deepseek_v3", num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                   qk_nope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                                   topk_group=1, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1),
    "llama4_text": lambda: _config("llama4_text", head_dim=8, num_local_experts=4, num_experts_per_tok=1, intermediate_size=32,
                                   intermediate_size_mlp=64, attention_chunk_size=4, no_rope_layer_interval=2),
    # No curated adapter: found from the model (layers, final norm, embedding, norms, linears).
    "gpt2": lambda: AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=2048,
                                         bos_token_id=1, eos_token_id=2),
    "cohere": lambda: _config("cohere", logit_scale=0.5),
}

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "llama4_text")
DISCOVERED_FAMILIES = ("gpt2", "cohere")


def tiny_config(family: str) -> PretrainedConfig:
    return TINY_FAMILIES[family]()


def eager(family: str) -> dict[str, str]:
    """``from_config`` / ``from_pretrained`` keyword arguments for the eager (reference) attention and experts paths:
    every dtype, and a mask and soft-capping the model applies itself."""
    return {"attn_implementation": "eager", **({"experts_implementation": "eager"} if family in MOE_FAMILIES else {})}


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random model of ``family`` on the eager attention and experts paths (see :func:`eager`), in eval mode.

    Norm weights and biases are drawn too (HF initialises them to constants), so that merges and
    concatenations that treat norms differently from projections give different results.
    """
    torch.manual_seed(seed)
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **eager(family)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            if "norm" in name and name.endswith("weight") or ".ln_" in name:
                tensor.copy_(tensor + 0.1 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("bias") and "correction" not in name:
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
    return model


def tiny_tokenizer():
    """A character-level fast tokenizer within the tiny vocabulary (<pad> 0, <s> 1, </s> 2, <unk> 3, printable ASCII 4-98),
    for what needs a real tokenizer: LaCo's sentences, checkpoints saved with their tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{chr(c): 4 + c - 32 for c in range(32, 127)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
