"""Token-level perplexity under the GPTQ/SparseGPT protocol used by layer-pruning papers.

Join the test documents with blank lines, tokenize once, cut non-overlapping ``seq_len`` windows and
average the next-token NLL over every predicted token. lm-eval's ``wikitext`` task reports *word*
perplexity on documents, a different number; do not compare the two.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerfold.data.text import token_ids
from layerfold.execution.loss import token_nll


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
    blocks, tokens_in_text = perplexity_windows(tokenizer, text, seq_len, max_windows, add_bos)
    nll, count = token_nll(model, blocks, batch_size, desc)
    return perplexity_result(nll, count, blocks, tokens_in_text, add_bos)


def perplexity_result(nll: float, count: int, blocks: torch.Tensor, tokens_in_text: int, add_bos: bool) -> dict:
    """The perplexity record: the value and the exact window/token counts behind it."""
    return {
        "perplexity": math.exp(nll / count),
        "seq_len": blocks.shape[1],
        "windows": blocks.shape[0],
        "tokens_scored": count,
        "tokens_in_text": tokens_in_text,
        "add_bos": add_bos,
    }


def perplexity_windows(tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, max_windows: int | None = None,
                       add_bos: bool = False) -> tuple[torch.Tensor, int]:
    """The token windows :func:`perplexity` scores ``[windows, seq_len]``, and the text's token count.

    Tokenize once, cut non-overlapping windows (``seq_len - 1`` tokens after a BOS when ``add_bos``);
    the layer-major path (:mod:`layerfold.execution`) scores the same windows.
    """
    ids = torch.tensor(token_ids(tokenizer, text), dtype=torch.long)
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
    return blocks, int(ids.numel())
