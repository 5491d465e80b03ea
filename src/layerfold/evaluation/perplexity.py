"""Token-level perplexity under the GPTQ/SparseGPT protocol used by layer-pruning papers.

Join the test documents with blank lines, tokenize once, cut non-overlapping ``seq_len`` windows and
average the next-token NLL over every predicted token. lm-eval's ``wikitext`` task reports *word*
perplexity on documents, a different number; do not compare the two.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerfold.scoring.loss import token_nll


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int,
    max_windows: int | None = None,
    add_bos: bool = False,
    batch_size: int = 1,
    desc: str | None = "perplexity",
) -> dict:
    """Perplexity of ``model`` on ``text``; returns the value with the exact window/token counts used."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise ValueError("eval.perplexity.add_bos=true but the tokenizer has no BOS token; set it to false.")
    body = seq_len - (1 if bos is not None else 0)
    windows = ids.numel() // body
    if windows == 0:
        raise ValueError(f"Text has {ids.numel()} tokens, fewer than one window of {seq_len}; lower eval.perplexity.seq_len.")
    if max_windows is not None:
        windows = min(windows, max_windows)
    blocks = ids[: windows * body].view(windows, body)
    if bos is not None:
        blocks = torch.cat([torch.full((windows, 1), bos, dtype=torch.long), blocks], dim=1)

    nll, count = token_nll(model, blocks, batch_size, desc)
    return {
        "perplexity": math.exp(nll / count),
        "seq_len": seq_len,
        "windows": windows,
        "tokens_scored": count,
        "tokens_in_text": int(ids.numel()),
        "add_bos": add_bos,
    }
