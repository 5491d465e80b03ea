"""Damaged inputs name themselves in the first stage that reads them: the file, the line, what was expected
and the fix, in one line. A plan.json or params.yaml that is not JSON/YAML, a data file with a corrupted
line, an empty file, a file of unicode noise, a damaged parquet file and a damaged resumable state."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, data_dir, models_dir
from omegaconf import OmegaConf
from stage_runner import stage, temps, write_params

from layerfold.data.benchmarks import prepare_benchmarks
from layerfold.data.text import LOCAL_FILES, load_corpus
from layerfold.io import DamagedFileError, read_json, read_jsonl

pytestmark = pytest.mark.hostile(input="data", expect=("message", "no-partial"))

ARC = "arc_easy/arc_easy.jsonl"
TRAIN = LOCAL_FILES["wikitext2_train"]
needs_data = pytest.mark.skipif(not data_dir().is_dir(), reason="local dataset folder not present (set LAYERFOLD_DATA_DIR)")


def one_error(result) -> str:
    assert result.code == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.errors) == 1, result.errors
    return result.errors[0]


def copy_data(dest: Path, *files: str) -> Path:
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir() / rel, dest / rel)
    return dest


# -- plan.json and params.yaml ------------------------------------------------------------------------


@pytest.mark.hostile(input="plan", stage="recover")
def test_hand_edited_plan_that_is_not_json(tmp_path):
    write_params(tmp_path, ["recovery=none"])
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")  # the fix names the stage that writes the file
    plan = tmp_path / "artifacts" / "compressed" / "plan.json"
    plan.parent.mkdir(parents=True)
    plan.write_text('{"method": {"name": "shortgpt"},\n "layers": [0, 1,, 2]}\n')
    message = one_error(stage("recover", tmp_path))
    assert message.startswith("[recover] DamagedFileError: artifacts/compressed/plan.json, line 2, column 18: not valid JSON (Expecting value)")
    assert "`dvc checkout --force artifacts/compressed`" in message and "`dvc repro --force --single-item compress`" in message
    assert not (tmp_path / "artifacts" / "recovered").exists() and not temps(tmp_path)


@pytest.mark.hostile(input="config", stage="validate")
def test_params_yaml_that_is_not_yaml(tmp_path):
    write_params(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(params.read_text() + "method: [shortgpt\n")
    line = params.read_text().count("\n")
    message = one_error(stage("validate", tmp_path))
    assert message.startswith(f"[validate] ConfigError: params.yaml, line {line + 1}, column 1: not valid YAML")
    assert "python scripts/compose_params.py" in message
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.hostile(input="config", stage="any")
@pytest.mark.parametrize("content, said", [("", "holds nothing"), ("- shortgpt\n", "holds a list"), ("\udcff", "not UTF-8")])
def test_params_yaml_that_is_no_mapping(tmp_path, content, said):
    from layerfold.config import ConfigError, load_params

    (tmp_path / "params.yaml").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=said):
        load_params(tmp_path / "params.yaml")


@pytest.mark.hostile(input="plan", stage="any")
@pytest.mark.parametrize("content, said", [(b"", "is empty; expected JSON"), (b'{"a": 1}\n\xff\xfe', "line 2: not UTF-8 text (byte 9)"),
                                           (b'{"a": 1', "line 1, column 8: not valid JSON")])
def test_read_json_names_file_line_and_fix(tmp_path, content, said):
    (tmp_path / "plan.json").write_bytes(content)
    with pytest.raises(DamagedFileError, match=r"plan\.json.*" + said.replace("(", r"\(").replace(")", r"\)")) as err:
        read_json(tmp_path / "plan.json")
    assert "Fix the file, or copy it again" in str(err.value)  # no dvc.yaml stage writes it


# -- data files ---------------------------------------------------------------------------------------


@needs_data
@pytest.mark.hostile(stage="data")
@pytest.mark.parametrize("line, said", [
    ('{"query": "Question: a', "line 7, column 11: not valid JSON (Unterminated string starting at"),
    ('["query", "choices"]', "line 7: a JSON list, expected one JSON object per line"),
    ('{"query": "Question: a?", "choices": ["x", "y"]}', "line 7: no 'gold'; expected every row to have the keys of line 1 (choices, query, gold)"),
])
def test_benchmark_file_with_a_corrupted_line(tmp_path, line, said):
    root = copy_data(tmp_path / "data", ARC)
    lines = (root / ARC).read_text().splitlines()
    lines[6] = line
    (root / ARC).write_text("\n".join(lines) + "\n")
    with pytest.raises(DamagedFileError) as err:
        prepare_benchmarks(root, tmp_path / "out", ["arc_easy"])
    assert f"{root / ARC}, {said}" in str(err.value) and "$LAYERFOLD_DATA_DIR" in str(err.value)
    assert not (tmp_path / "out" / "arc_easy").exists() and not temps(tmp_path)


@pytest.mark.hostile(stage="data")
def test_jsonl_without_rows(tmp_path):
    (tmp_path / "rows.jsonl").write_text("\n\n")
    with pytest.raises(DamagedFileError, match=r"rows\.jsonl holds no rows; expected one JSON object per line"):
        read_jsonl(tmp_path / "rows.jsonl")


def noise(kind: str) -> bytes:
    rng = random.Random(0)
    if kind == "bytes":  # a file of random bytes: not UTF-8 at all
        return bytes(rng.randrange(256) for _ in range(4000))
    # valid UTF-8 made of code points no text uses: controls, private use, unassigned
    points = [rng.choice([rng.randrange(0x01, 0x09), rng.randrange(0xE000, 0xF8FF), rng.randrange(0x50000, 0xDFFFF)]) for _ in range(4000)]
    return "".join(map(chr, points)).encode("utf-8")


@needs_data
@pytest.mark.hostile(stage="data")
@pytest.mark.parametrize("content, said", [
    (b"", "is empty; expected UTF-8 text"),
    (b"  \n\n \r\n", "is empty; expected UTF-8 text"),
    (b"= Valkyria =\n\n\xff\xfe\xfa broken", "line 3: not UTF-8 text (byte 14: invalid start byte)"),
    (noise("bytes"), "line 1: not UTF-8 text"),
    (noise("code points"), "is not text: 100% of its 4,000 characters are control, unassigned or replacement characters"),
])
def test_calibration_text_that_is_empty_or_noise(tmp_path, content, said):
    root = tmp_path / "data"
    (root / TRAIN).parent.mkdir(parents=True)
    (root / TRAIN).write_bytes(content)
    with pytest.raises(DamagedFileError) as err:
        load_corpus("wikitext2_train", str(root))
    assert str(err.value).startswith(f"Data file {TRAIN}") and said in str(err.value), str(err.value)
    assert "Copy an intact file there" in str(err.value)


def test_real_text_with_a_few_odd_characters_is_text(tmp_path):
    """The noise check must not refuse real text: a stray control character or private-use glyph is fine."""
    root = tmp_path / "data"
    (root / TRAIN).parent.mkdir(parents=True)
    odd = "The tower is 324 metres tall.\x07 It was built in 1889 \ue000.\n"  # 2 odd characters in 3,000
    (root / TRAIN).write_text(odd + "The tower is 324 metres tall. It was built in 1889.\n" * 60, encoding="utf-8")
    assert load_corpus("wikitext2_train", str(root)).documents


@needs_data
@pytest.mark.hostile(stage="data")
def test_damaged_parquet(tmp_path):
    rel = LOCAL_FILES["c4"]
    root = copy_data(tmp_path / "data", rel)
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(data[: len(data) // 3])
    with pytest.raises(DamagedFileError, match=f"Data file {rel} is not a readable parquet file with a 'text' column"):
        load_corpus("c4", str(root))


@needs_data
@pytest.mark.hostile(stage="data")
@pytest.mark.skipif(not (models_dir() / "stories260K").is_dir(), reason="stories260K not present")
def test_data_stage_reports_a_noise_file_in_one_line(tmp_path, stories):
    """The whole stage, as DVC runs it: one line on stderr, no prepared folder, no temp."""
    checkpoint, _, _ = stories
    work = tmp_path / "work"
    write_params(work)
    shutil.copytree(checkpoint, work / "artifacts" / "base")
    root = tmp_path / "data"
    (root / TRAIN).parent.mkdir(parents=True)
    (root / TRAIN).write_bytes(noise("code points"))
    message = one_error(stage("data", work, LAYERFOLD_DATA_DIR=str(root)))
    assert message.startswith(f"[data] DamagedFileError: Data file {TRAIN} is not text")
    assert not (work / "data" / "prepared" / "calibration").exists() and not temps(work)


# -- checkpoints --------------------------------------------------------------------------------------


@pytest.mark.hostile(input="checkpoint", stage="recover")
def test_damaged_resumable_state(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "tests" / "recovery"))
    from conftest import tiny_model
    from test_engine import recovery_cfg, removed, tokens

    from layerfold.recovery import RecoveryEngine

    teacher = tiny_model("llama")
    student, plan = removed(teacher, [1, 2])
    (tmp_path / "state.pt").write_bytes(b"PK\x03\x04 half a zip")
    cfg = recovery_cfg("distill", max_steps=2, batch_size=2)
    with pytest.raises(DamagedFileError, match=r"The resumable recovery state .*state\.pt is damaged .* Delete .* to start the recovery from its first step"):
        RecoveryEngine(student, teacher, plan, cfg, tokens(4), tokens(2), state_dir=tmp_path, progress=False).run()
    assert torch.equal(next(student.parameters()), next(removed(teacher, [1, 2])[0].parameters()))  # untouched


def test_config_reader_keeps_scientific_floats(tmp_path):
    """The checked YAML reader is OmegaConf's: 1e-4 stays a float (PyYAML alone would read a string)."""
    from layerfold.config import _read_yaml

    (tmp_path / "p.yaml").write_text("recovery:\n  lr: 1e-4\n")
    assert OmegaConf.to_container(_read_yaml(tmp_path / "p.yaml")) == {"recovery": {"lr": 1e-4}}
    assert isinstance(json.loads(json.dumps(OmegaConf.to_container(_read_yaml(tmp_path / "p.yaml"))))["recovery"]["lr"], float)
