"""The scale scripts on CPU with the tiny shape: a random checkpoint written layer by layer, and the 70B
benchmark's whole sequence of steps (capture, Block Influence, removal + merge, perplexity)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_benchmark, models_dir
from execution_fixtures import _single_thread  # noqa: F401  (fixture)
from transformers import AutoConfig

from layerfold.execution import SafetensorsLayerLoader, SeededLayerLoader
from layerfold.models import check_compatible, load_checkpoint

@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    if not (models_dir() / "stories260K" / "tok512.bin").is_file():
        pytest.skip("stories260K tokenizer not found (set LAYERFOLD_MODELS_DIR)")
    out = tmp_path_factory.mktemp("random") / "tiny"
    index = load_benchmark("make_random_checkpoint").main(["--shape", "tiny", "--out", str(out), "--shard-gb", "0.0002", "--seed", "5"])
    return out, index


def test_random_checkpoint_is_sharded_and_loads(random_checkpoint):
    out, index = random_checkpoint
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    seeded = SeededLayerLoader(AutoConfig.from_pretrained(out), seed=5, dtype=torch.bfloat16, generator_device="cpu")
    tensors = [*seeded.load_outer("cpu", torch.bfloat16).values()] + [t for i in range(4) for t in seeded.load_layer(i, "cpu", torch.bfloat16).values()]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors)  # tensor bytes, as HF counts them
    layer_shards = [{index["weight_map"][k] for k in index["weight_map"] if k.startswith(f"model.layers.{i}.")} for i in range(4)]
    assert all(len(s) == 1 for s in layer_shards)  # a layer never straddles two shards
    model, tokenizer = load_checkpoint(out)
    check_compatible(model, tokenizer)  # every token id has an embedding row
    assert len(tokenizer) == 512 and model.config.layerfold_source["name"] == "random-tiny-seed5"


def test_random_checkpoint_holds_the_seeded_loaders_weights(random_checkpoint):
    out, _ = random_checkpoint
    seeded = SeededLayerLoader(AutoConfig.from_pretrained(out), seed=5, dtype=torch.bfloat16, generator_device="cpu")
    from_disk = SafetensorsLayerLoader(out)
    model, _ = load_checkpoint(out, dtype=torch.bfloat16)
    for i in range(4):
        expected = seeded.load_layer(i, "cpu", torch.bfloat16)
        got = from_disk.load_layer(i, "cpu", torch.bfloat16)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (i, key)
            assert torch.equal(model.model.layers[i].state_dict()[key], expected[key]), (i, key)
    outer = seeded.load_outer("cpu", torch.bfloat16)
    assert all(torch.equal(from_disk.load_outer("cpu", torch.bfloat16)[k], v) for k, v in outer.items())


def test_tokenizer_choice_follows_the_vocabulary():
    script = load_benchmark("make_random_checkpoint")
    if not (models_dir() / "stories260K" / "tok512.bin").is_file():
        pytest.skip("stories260K tokenizer not found (set LAYERFOLD_MODELS_DIR)")
    name, tokenizer = script.fitting_tokenizer(32000, None)  # Llama-2: SmolLM2's 49,152 ids would overflow
    assert name == "stories260k" and len(tokenizer) <= 32000
    with pytest.raises(SystemExit, match="No local tokenizer fits"):
        script.fitting_tokenizer(100, None)


def test_sequential_70b_benchmark_runs_the_tiny_shape(tmp_path):
    out = tmp_path / "sequential_tiny.json"
    load_benchmark("sequential_70b").main(["--shape", "tiny", "--windows", "2", "--seq-len", "64", "--calib", "2x64", "--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record) >= {"benchmark", "environment", "settings", "rows", "notes"}
    rows = {r["name"]: r for r in record["rows"]}
    assert rows["parity"]["met"] is True and len(rows["parity"]["relative_nll_difference"]) == 2
    assert list(rows) == ["parity", "generate layer (cpu)", "capture", "perplexity dense", "plan", "perplexity planned", "total"]
    assert rows["capture"]["tokens"] == 2 * 64 and rows["capture"]["execution"]["layers_run"] == 4
    assert rows["plan"]["layers_after"] == 2 and rows["perplexity planned"]["execution"]["layers_run"] == 2
    for name in ("perplexity dense", "perplexity planned"):
        assert math.isfinite(rows[name]["perplexity"]) and rows[name]["perplexity"] > 1
    assert rows["perplexity dense"]["perplexity"] != rows["perplexity planned"]["perplexity"]
    assert all(r["peak_host_mib"] > 0 for r in record["rows"]) and rows["total"]["met"] is True
    assert record["plan"]["removed"] == [rows["plan"]["removed_layer"]]


def test_sequential_benchmark_reads_a_checkpoint_and_matches_resident(random_checkpoint, tmp_path):
    out, _ = random_checkpoint
    result = tmp_path / "from_disk.json"
    record = load_benchmark("sequential_70b").main(["--checkpoint", str(out), "--windows", "2", "--seq-len", "32", "--calib", "2x32", "--out", str(result)])
    rows = {r["name"]: r for r in record["rows"]}
    assert "read layer (disk)" in rows and "generate layer (cpu)" not in rows
    assert rows["perplexity resident"]["met"] is True and rows["perplexity resident"]["relative_nll_difference"] < 1e-5
    assert rows["perplexity resident"]["perplexity"] == pytest.approx(rows["perplexity dense"]["perplexity"], rel=1e-4)
    assert rows["total"]["met"] is True and json.loads(result.read_text())["settings"]["source"] == str(out)
