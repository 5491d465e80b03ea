"""Calibration blocks from the local data directory, and the errors for missing or short data."""

import pytest
import torch
from omegaconf import OmegaConf

from layerfold.config import CalibrationConfig
from layerfold.data.calibration import CalibrationDataError, build_calibration
from layerfold.data.text import load_corpus


class CharTokenizer:
    """Byte-level stand-in: one id per byte, BOS = 1; enough to test chunking exactly."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, verbose=True):  # the arguments of a transformers tokenizer that layerfold passes
        return {"input_ids": [b + 3 for b in text.encode("utf-8")]}


def calibration_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(CalibrationConfig), overrides)


def test_concat_blocks_with_bos_and_recorded_policy(shared_data):
    cfg = calibration_cfg(num_blocks=4, seq_len=64, seed=3)
    blocks, meta = build_calibration(cfg, CharTokenizer(), str(shared_data))
    assert blocks.shape == (4, 64)
    assert torch.all(blocks[:, 0] == 1)
    assert meta["chunking"] == "concat" and meta["add_bos"] and meta["seq_len"] == 64
    assert meta["sha256"] == "ed14f9ef053842b47270b885f9d4120f4bf6a5b9a00d19e786eb39144ec10cd3"
    again, _ = build_calibration(cfg, CharTokenizer(), str(shared_data))
    assert torch.equal(blocks, again)


def test_per_document_blocks_without_bos(shared_data):
    cfg = calibration_cfg(source="c4", chunking="per_document", num_blocks=3, seq_len=32, add_bos=False)
    blocks, meta = build_calibration(cfg, CharTokenizer(), str(shared_data))
    assert blocks.shape == (3, 32) and not meta["add_bos"]
    assert meta["origin"].endswith("c4_validation_2k.parquet")


def test_calibration_and_evaluation_c4_halves_are_disjoint(shared_data):
    evaluation = load_corpus("c4", str(shared_data)).documents
    calibration = load_corpus("c4_calibration", str(shared_data)).documents
    assert len(evaluation) == 1000 and len(calibration) == 1000
    assert not set(evaluation) & set(calibration)


def test_wikitext_test_is_the_joined_rows_without_cr(shared_data):
    text = load_corpus("wikitext2_test", str(shared_data)).text
    assert "\r" not in text
    assert text.startswith("\n\n = Robert Boulter = \n\n")  # row 0 is empty, as in the hub split


def test_too_little_text_names_the_fix(shared_data):
    cfg = calibration_cfg(num_blocks=100000, seq_len=512)
    with pytest.raises(CalibrationDataError, match="Lower num_blocks or seq_len"):
        build_calibration(cfg, CharTokenizer(), str(shared_data))


def test_missing_data_dir_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="LAYERFOLD_DATA_DIR"):
        load_corpus("wikitext2_train", str(tmp_path / "nowhere"))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="wikitext2_train_5k.txt"):
        load_corpus("wikitext2_train", str(tmp_path))


def test_evaluation_split_is_not_a_calibration_source(shared_data):
    with pytest.raises(CalibrationDataError, match="never sees test text"):
        build_calibration(calibration_cfg(source="wikitext2_test"), CharTokenizer(), str(shared_data))
