"""Training text for the recover stage: token blocks from a mix of sources, with a held-out validation split.

Local sources never touch evaluation text: ``c4`` is the half of the local C4 file that evaluation
does not read (documents 1000-1999, the same half calibration draws from), ``wikitext2_train`` the
WikiText-2 *train* excerpt. ``hub:<dataset>[:<config>]`` streams a hub corpus's train split (e.g.
``hub:HuggingFaceFW/fineweb-edu:sample-10BT``, ``hub:DKYoon/SlimPajama-6B``) for runs with network access.

Per source, documents are shuffled with the seed and the last ``val_fraction`` of them held out; the
rest are joined with blank lines, tokenized once and cut into non-overlapping ``seq_len`` blocks (BOS
first when ``add_bos``), as calibration's ``concat`` policy does.
"""

from __future__ import annotations

import random

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from layerfold.data.text import load_corpus, token_ids

LOCAL_SOURCES = {"c4": "c4_calibration", "wikitext2_train": "wikitext2_train"}


class TrainingDataError(ValueError):
    pass


def _documents(source: str, local_dir: str | None, wanted_tokens: int | None) -> tuple[list[str], str, str | None]:
    if source in LOCAL_SOURCES:
        corpus = load_corpus(LOCAL_SOURCES[source], local_dir)
        return corpus.documents, corpus.origin, corpus.sha256
    if source.startswith("hub:"):
        if wanted_tokens is None:
            raise TrainingDataError(f"recovery.data.sources has the hub corpus '{source}': set recovery.data.train_tokens to bound the download.")
        return _hub_documents(source[4:], wanted_tokens), source, None
    raise TrainingDataError(
        f"recovery.data.sources: unknown source '{source}'; use {', '.join(LOCAL_SOURCES)} or hub:<dataset>[:<config>]. "
        "Evaluation text (wikitext2_test, the first C4 half) is not offered."
    )


def _hub_documents(spec: str, wanted_tokens: int) -> list[str]:
    """Stream documents until roughly ``wanted_tokens`` (4 characters per token) are collected."""
    from datasets import load_dataset

    name, _, config = spec.partition(":")
    rows = load_dataset(name, config or None, split="train", streaming=True)
    docs, chars = [], 0
    for row in rows:
        docs.append(row["text"])
        chars += len(row["text"])
        if chars >= 5 * wanted_tokens:
            break
    return docs


def _blocks(docs: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, bos: int | None, max_blocks: int | None = None) -> torch.Tensor:
    """Join ``docs`` with blank lines, tokenize once, cut ``seq_len`` blocks (at most ``max_blocks``)."""
    body = seq_len - (1 if bos is not None else 0)
    # With a cap, tokenize a growing prefix of the documents (about 4 characters per token, so start at
    # twice that) rather than the whole source: a small token budget should not pay for all of it.
    chars_wanted = None if max_blocks is None else 8 * max_blocks * body
    while True:
        used, chars = len(docs), 0
        if chars_wanted is not None:
            used = 0
            while used < len(docs) and chars < chars_wanted:
                chars, used = chars + len(docs[used]) + 2, used + 1
        if used == 0:
            return torch.empty(0, seq_len, dtype=torch.long)
        ids = torch.tensor(token_ids(tokenizer, "\n\n".join(docs[:used])), dtype=torch.long)
        blocks = ids[: ids.numel() // body * body].view(-1, body)
        if max_blocks is None or blocks.shape[0] >= max_blocks or used == len(docs):
            break
        chars_wanted *= 2
    blocks = blocks[:max_blocks]
    if bos is not None:
        blocks = torch.cat([torch.full((blocks.shape[0], 1), bos, dtype=torch.long), blocks], dim=1)
    return blocks


def build_training_data(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, local_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Return ``(train [n, seq_len], validation [m, seq_len], metadata)`` for ``recovery.data``."""
    sources, weights = list(cfg.sources), list(cfg.weights)
    if not sources:
        raise TrainingDataError("recovery.data.sources is empty; name at least one source, e.g. [c4, wikitext2_train].")
    if len(weights) != len(sources) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise TrainingDataError(
            f"recovery.data.weights={weights} must give one non-negative share per source ({len(sources)}: {sources}), not all zero."
        )
    bos = tokenizer.bos_token_id if cfg.add_bos else None
    if cfg.add_bos and bos is None:
        raise TrainingDataError("recovery.data.add_bos=true but the tokenizer has no BOS token; set it to false.")
    shares = [w / sum(weights) for w in weights]
    train_parts, val_parts, mix = [], [], []
    for source, share in zip(sources, shares):
        wanted = None if cfg.train_tokens is None else int(round(share * cfg.train_tokens))
        docs, origin, sha = _documents(source, local_dir, wanted)
        order = list(range(len(docs)))
        random.Random(cfg.seed).shuffle(order)
        held = max(1, int(round(cfg.val_fraction * len(docs)))) if len(docs) > 1 else 0
        train_docs = [docs[i] for i in order[: len(docs) - held]]
        val_docs = [docs[i] for i in order[len(docs) - held :]]
        train = _blocks(train_docs, tokenizer, cfg.seq_len, bos, None if wanted is None else -(-wanted // cfg.seq_len))
        train_parts.append(train)
        val_parts.append(_blocks(val_docs, tokenizer, cfg.seq_len, bos, cfg.val_blocks))
        mix.append({
            "source": source, "origin": origin, "sha256": sha, "share_requested": round(share, 4),
            "documents_train": len(train_docs), "documents_val": len(val_docs),
            "train_blocks": int(train.shape[0]), "train_tokens": int(train.numel()),
        })
    train = torch.cat(train_parts)
    if train.shape[0] == 0:
        raise TrainingDataError(
            f"recovery.data gives zero training tokens (sources {sources}, seq_len {cfg.seq_len}, train_tokens {cfg.train_tokens}); "
            "raise train_tokens, lower seq_len, or add a source."
        )
    val = torch.cat(val_parts)
    generator = torch.Generator().manual_seed(cfg.seed)
    val = val[torch.randperm(val.shape[0], generator=generator)[: cfg.val_blocks]]
    total = int(train.numel())
    for entry in mix:
        entry["share_actual"] = round(entry["train_tokens"] / total, 4)
    meta = {
        "seq_len": cfg.seq_len, "add_bos": bool(cfg.add_bos), "seed": cfg.seed,
        "train_blocks": int(train.shape[0]), "train_tokens": total,
        "val_blocks": int(val.shape[0]), "val_tokens": int(val.numel()), "mix": mix,
    }
    return train, val, meta
