"""An exported GGUF checked by a reader, not by the writer: transformers' GGUF loader against the checkpoint.

transformers dequantises a GGUF into a plain model (``from_pretrained(folder, gguf_file=name)``), undoing
the rotary permutation and reading the config from the GGUF's metadata; its logits on the same tokens are
compared with the checkpoint's, both computed in float32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from layerfold.execution.loss import token_nll
from layerfold.models.sources import load_checkpoint


def load_gguf(path: str | Path, tokenizer: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The GGUF file as transformers reads it: a float32 model (and its tokenizer when asked)."""
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None


@torch.no_grad()
def compare_logits(reference: PreTrainedModel, candidate: PreTrainedModel, input_ids: torch.Tensor) -> dict:
    """Logit differences and mean next-token NLL of two models on the same ``[n, seq]`` token ids."""
    ref = reference(input_ids=input_ids, use_cache=False).logits.float()
    got = candidate(input_ids=input_ids, use_cache=False).logits.float()
    diff = (got - ref).abs()
    nll_ref, count = token_nll(reference, input_ids, batch_size=input_ids.shape[0])
    nll_got, _ = token_nll(candidate, input_ids, batch_size=input_ids.shape[0])
    return {
        "tokens": int(input_ids.numel()),
        "identical_logits": bool(torch.equal(got, ref)),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "nll_checkpoint": nll_ref / count,
        "nll_gguf": nll_got / count,
    }


def verify_export(checkpoint: str | Path, gguf_path: str | Path, input_ids: torch.Tensor) -> dict:
    """Load both (the checkpoint through layerfold's loader, the GGUF through transformers') and compare them."""
    reference, _ = load_checkpoint(checkpoint, "cpu", torch.float32)
    candidate, _ = load_gguf(gguf_path)
    if candidate.config.num_hidden_layers != reference.config.num_hidden_layers:
        raise AssertionError(f"transformers reads {candidate.config.num_hidden_layers} layers from {gguf_path}, "
                             f"the checkpoint has {reference.config.num_hidden_layers}")
    return {"reader": "transformers (gguf_file=)", "layers": candidate.config.num_hidden_layers,
            **compare_logits(reference, candidate, input_ids)}
