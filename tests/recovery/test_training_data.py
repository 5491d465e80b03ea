"""Training text for the recover stage: never the evaluation half, a held-out split, the mix recorded."""

from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import OmegaConf

from layerfold.config import RecoveryDataConfig
from layerfold.data.text import C4_EVAL_DOCS, LOCAL_FILES
from layerfold.data.training import TrainingDataError, build_training_data
from layerfold.models.llama2c import load_llama2c
from conftest import models_dir


@pytest.fixture(scope="module")
def tokenizer():
    root = models_dir() / "stories260K"
    if not root.is_dir():
        pytest.skip("stories260K not present")
    return load_llama2c(root / "stories260K.bin", root / "tok512.bin")[1]


def cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(RecoveryDataConfig), overrides)


def test_c4_training_text_never_comes_from_the_evaluation_half(shared_data, tokenizer):
    train, val, meta = build_training_data(cfg(sources=["c4"], weights=[1.0], seq_len=64), tokenizer, str(shared_data))
    docs = pd.read_parquet(shared_data / LOCAL_FILES["c4"], columns=["text"])["text"].tolist()
    entry = meta["mix"][0]
    assert entry["documents_train"] + entry["documents_val"] == len(docs) - C4_EVAL_DOCS
    # every training block decodes to text found in the second half, none only in the first
    second_half = "\n\n".join(docs[C4_EVAL_DOCS:])
    sample = tokenizer.decode(train[0, 1:33].tolist())
    assert sample.strip()[:40] in second_half
    assert train.shape[1] == 64 and (train[:, 0] == tokenizer.bos_token_id).all()
    assert meta["train_tokens"] == train.numel() and val.shape[0] > 0


def test_validation_documents_are_held_out_and_the_mix_recorded(shared_data, tokenizer):
    train, val, meta = build_training_data(
        cfg(sources=["c4", "wikitext2_train"], weights=[3, 1], seq_len=64, train_tokens=64 * 40), tokenizer, str(shared_data)
    )
    assert train.shape == (40, 64)
    blocks = [m["train_blocks"] for m in meta["mix"]]
    assert blocks == [30, 10]
    assert [m["share_actual"] for m in meta["mix"]] == [0.75, 0.25]
    assert all(m["documents_val"] >= 1 for m in meta["mix"])
    train_rows = {tuple(r) for r in train.tolist()}
    assert not any(tuple(r) in train_rows for r in val.tolist())


@pytest.mark.parametrize("overrides, match", [
    ({"sources": ["wikitext2_test"], "weights": [1.0]}, "unknown source 'wikitext2_test'"),
    ({"sources": ["c4"], "weights": [0.5, 0.5]}, "one non-negative share per source"),
    ({"sources": ["c4"], "weights": [1.0], "seq_len": 100_000_000}, "zero training tokens"),
])
def test_bad_training_data_is_an_error(shared_data, tokenizer, overrides, match):
    with pytest.raises(TrainingDataError, match=match):
        build_training_data(cfg(**overrides), tokenizer, str(shared_data))
