"""The export stage on stories260K, through the stage scripts: off by default, on it writes a GGUF transformers reads."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, data_dir, models_dir
from layerfold.config import ConfigError, compose
from layerfold.stage import METRICS

TINY = ["model=stories260k", "data.calibration.num_blocks=4", "data.calibration.seq_len=64", "data.benchmarks=[]", "eval.lm_eval.tasks=[]",
        "method.num_remove=2", "eval.perplexity.seq_len=128"]


def write_params(overrides: list[str]) -> None:
    with open("params.yaml", "w") as handle:
        yaml.safe_dump(compose(REPO / "conf", [*TINY, *overrides]), handle, sort_keys=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    if not (data_dir().is_dir() and (models_dir() / "stories260K").is_dir()):
        pytest.skip("local datasets/models folders not present")
    from pipeline import base, capture, compress, data, recover

    path = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    mp.chdir(path)
    mp.setenv("LAYERFOLD_DATA_DIR", str(data_dir()))
    mp.setenv("LAYERFOLD_MODELS_DIR", str(models_dir()))
    write_params([])
    for stage in (base, data, capture, compress, recover):
        stage.main()
    yield path
    mp.undo()


def test_disabled_by_default(workdir, monkeypatch):
    from pipeline import export

    monkeypatch.chdir(workdir)
    write_params([])
    export.main()
    assert json.loads((METRICS / "export.json").read_text()) == {"enabled": False}
    assert sorted(p.name for p in (workdir / "artifacts" / "export").iterdir()) == ["export.json"]


def test_enabled_writes_a_gguf_of_the_recovered_checkpoint(workdir, monkeypatch):
    """recovery=none: the recovered checkpoint is a pointer to the compressed one (3 layers); the file transformers
    reads back has 3 layers and its logits match the checkpoint's to f16 rounding."""
    from pipeline import export

    monkeypatch.chdir(workdir)
    write_params(["export.enabled=true", "export.quantization=f16"])
    export.main()
    report = json.loads((workdir / "artifacts" / "export" / "export.json").read_text())
    assert report["block_count"] == 3 and report["checkpoint"] == "artifacts/compressed" and report["checkpoint_kind"] == "stock"
    assert report["bytes"] == (workdir / "artifacts" / "export" / "model.gguf").stat().st_size
    assert report["tokenizer"] == "converted from the checkpoint's tokenizer.json"
    verify = report["verify"]
    assert verify["layers"] == 3 and verify["max_abs_logit_diff"] < 0.1 and verify["top1_agreement"] > 0.95
    assert abs(verify["nll_gguf"] - verify["nll_checkpoint"]) < 0.01
    metrics = json.loads((METRICS / "export.json").read_text())
    assert metrics["enabled"] and metrics["file_type"] == "MOSTLY_F16"


def test_source_quantisation_needs_a_gguf_model(workdir, monkeypatch):
    """quantization=source on a llama2.c model: refused by the params check every stage runs first (the validate
    stage's), so the previous export is kept."""
    from pipeline import export

    monkeypatch.chdir(workdir)
    write_params(["export.enabled=true"])
    before = sorted(p.name for p in (workdir / "artifacts" / "export").iterdir())
    with pytest.raises(ConfigError, match="export.quantization=source .* model.source=llama2c is not a GGUF"):
        export.main()
    assert sorted(p.name for p in (workdir / "artifacts" / "export").iterdir()) == before
