"""Calibration blocks: token windows cut from a corpus under one explicit, recorded policy."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from layerfold.data.text import CALIBRATION_SOURCES, load_corpus, token_ids


class CalibrationDataError(ValueError):
    pass


def build_calibration(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, local_dir: str | None) -> tuple[torch.Tensor, dict]:
    """Return ``(input_ids [num_blocks, seq_len], metadata)`` for ``data.calibration``.

    ``concat`` joins documents with blank lines, tokenizes once and draws ``num_blocks`` random
    non-overlapping windows (the GPTQ/SLEB convention); ``per_document`` takes the first ``seq_len``
    tokens of randomly chosen documents long enough to fill a window (ShortGPT-style). With ``add_bos``
    the first position of every window is the BOS token, so each window reads like a fresh document.
    """
    if cfg.source not in CALIBRATION_SOURCES:
        raise CalibrationDataError(
            f"Unknown calibration source '{cfg.source}'; choose one of {sorted(CALIBRATION_SOURCES)}. "
            "Evaluation splits are not offered, so calibration never sees test text."
        )
    corpus = load_corpus(CALIBRATION_SOURCES[cfg.source], local_dir)
    if not corpus.text.strip():
        raise CalibrationDataError(
            f"The calibration source '{cfg.source}' ({corpus.origin}) holds no text. Restore the file in the data "
            "directory or choose another data.calibration.source."
        )
    bos = tokenizer.bos_token_id if cfg.add_bos else None
    if cfg.add_bos and bos is None:
        raise CalibrationDataError("data.calibration.add_bos=true but the tokenizer has no BOS token; set it to false.")
    body = cfg.seq_len - (1 if bos is not None else 0)
    generator = torch.Generator().manual_seed(cfg.seed)

    if cfg.chunking == "concat":
        ids = torch.tensor(token_ids(tokenizer, corpus.text), dtype=torch.long)
        available = ids.numel() // body
        _require(available, cfg, ids.numel())
        starts = torch.randperm(available, generator=generator)[: cfg.num_blocks] * body
        windows = [ids[s : s + body] for s in starts.sort().values.tolist()]
        total_tokens = ids.numel()
    elif cfg.chunking == "per_document":
        order = torch.randperm(len(corpus.documents), generator=generator).tolist()
        windows, total_tokens = [], 0
        for i in order:
            doc = token_ids(tokenizer, corpus.documents[i])
            total_tokens += len(doc)
            if len(doc) >= body:
                windows.append(torch.tensor(doc[:body], dtype=torch.long))
            if len(windows) == cfg.num_blocks:
                break
        _require(len(windows), cfg, total_tokens)
    else:
        raise CalibrationDataError(f"Unknown chunking '{cfg.chunking}'; use concat or per_document.")

    blocks = torch.stack(windows)
    if bos is not None:
        blocks = torch.cat([torch.full((blocks.shape[0], 1), bos, dtype=torch.long), blocks], dim=1)
    meta = {
        "source": cfg.source,
        "origin": corpus.origin,
        "sha256": corpus.sha256,
        "chunking": cfg.chunking,
        "seq_len": cfg.seq_len,
        "num_blocks": int(blocks.shape[0]),
        "add_bos": bool(cfg.add_bos),
        "bos_token_id": bos,
        "seed": cfg.seed,
        "tokens_in_source": int(total_tokens),
    }
    return blocks, meta


def _require(available: int, cfg: DictConfig, tokens: int) -> None:
    if available < cfg.num_blocks:
        raise CalibrationDataError(
            f"Calibration text too short: '{cfg.source}' gives {available} windows of {cfg.seq_len} tokens "
            f"({tokens} tokens, chunking={cfg.chunking}) but data.calibration.num_blocks={cfg.num_blocks}. "
            "Lower num_blocks or seq_len, or choose a larger source."
        )
