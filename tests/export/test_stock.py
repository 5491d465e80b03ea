"""Which outputs are stock: checkpoint_kind, the serving-config check, every method's output against docs/export.md."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, tiny_model
from layerfold.capture import capture_statistics
from layerfold.config import ConfigError, compose, parse_params
from layerfold.export import STOCK, checkpoint_kind, serving_config_problems, tensor_shapes
from layerfold.methods import REGISTRY, MethodContext, compress, get_method
from layerfold.models import load_checkpoint, save_checkpoint
from layerfold.models.facts import ModelFacts
from layerfold.models.sources import write_pointer
from layerfold.validation import check

DOCS = REPO / "docs" / "export.md"
ROW = re.compile(r"^\| `(?P<method>\w+)` \|(?P<settings>[^|]*)\| (?P<kind>stock|custom[^|]*) \|", re.M)


def classification_rows() -> list[tuple[str, dict, str]]:
    """``(method, settings, documented kind)`` for every row of docs/export.md's classification table."""
    rows = []
    for match in ROW.finditer(DOCS.read_text(encoding="utf-8")):
        settings = dict(pair.split(": ", 1) for pair in re.findall(r"`([\w.]+: [\w.]+)`", match["settings"]))
        rows.append((match["method"], settings, match["kind"].strip()))
    return rows


def test_every_registered_method_is_classified():
    get_method({"name": "shortgpt"})  # loads the registry
    assert {method for method, _, _ in classification_rows()} == set(REGISTRY)


# 5 layers: what every method's config needs to run on stories260K in seconds
TINY = {"num_remove": 2, "target_layers": 3, "n_neighbors": 3, "k_entropy": 4}


@pytest.mark.parametrize("method, settings, documented", classification_rows(),
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_documented_kind_is_what_the_method_writes(stories, tmp_path, one_thread, method, settings, documented):
    """Run the method (its conf/method defaults, the row's settings) on stories260K, save as the compress stage does,
    and classify the checkpoint: the kind must be the one docs/export.md states."""
    checkpoint, _, tokenizer = stories
    raw = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "method" / f"{method}.yaml"))
    for key, value in TINY.items():
        if raw.get(key) is not None:
            raw[key] = value
    raw.update({k: yaml_value(v) for k, v in settings.items()})
    model, _ = load_checkpoint(checkpoint)
    blocks = torch.randint(3, 512, (16, 24), generator=torch.Generator().manual_seed(0))
    stats = capture_statistics(model, blocks, 4, None)
    compress(MethodContext(model, tokenizer, blocks, stats, batch_size=4), raw)
    save_checkpoint(model, tokenizer, tmp_path / "out", dtype=torch.float32)
    kind = checkpoint_kind(tmp_path / "out")
    assert kind == documented if documented == STOCK else kind.startswith("custom: "), kind
    if documented == STOCK:
        assert serving_config_problems(json.loads((tmp_path / "out" / "config.json").read_text()), tensor_shapes(tmp_path / "out")) == []


def yaml_value(text: str):
    return OmegaConf.create({"v": text}).v if not text.isdigit() else int(text)


def test_pointer_is_followed(stories, tmp_path):
    checkpoint, _, _ = stories
    (tmp_path / "recovered").mkdir()
    write_pointer(tmp_path / "recovered", checkpoint)
    assert checkpoint_kind(tmp_path / "recovered") == STOCK


def test_custom_code_is_not_stock(stories, tmp_path):
    checkpoint, _, _ = stories
    shutil.copytree(checkpoint, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    assert checkpoint_kind(tmp_path / "c").startswith("custom: config.json's auto_map (AutoModelForCausalLM) needs custom modeling code")


# The serving-config check ----------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    """A tiny GQA Llama (4 layers, 4 query / 2 key-value heads), saved."""
    path = tmp_path / "tiny"
    model = tiny_model("llama")
    model.config.layer_types = ["full_attention"] * 4
    model.save_pretrained(path)
    return path


def problems(path: Path, **changes) -> list[str]:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    return serving_config_problems(config, tensor_shapes(path))


def test_consistent_config_has_no_problem(saved):
    assert problems(saved) == []
    assert problems(saved, num_attention_heads=[4] * 4, num_key_value_heads=[2, 2, 2, 2]) == []  # declared per layer


def test_per_layer_list_must_match_the_layer_count(saved):
    assert problems(saved, layer_types=["full_attention"] * 5) == ["config.json's layer_types has 5 entries for 4 layers (num_hidden_layers)"]
    assert "a list of 3 entries for 4 layers" in problems(saved, num_key_value_heads=[2, 2, 2])[0]


def test_layer_count_must_match_the_weights(saved):
    found = problems(saved, num_hidden_layers=5, layer_types=["full_attention"] * 5)
    assert found == ["the weights hold layers 0..3 (4) but num_hidden_layers=5 (missing [4])"]
    assert "beyond the config: [3]" in problems(saved, num_hidden_layers=3, layer_types=["full_attention"] * 3)[0]


def test_head_counts_must_match_every_layers_shapes(saved):
    found = problems(saved, num_key_value_heads=4)
    assert found and all("k_proj" in p or "v_proj" in p for p in found) and found[0].startswith("layer 0: self_attn.k_proj.weight is [16, 32]")
    assert any("mlp.gate_proj.weight is [64, 32], but the config states [48, 32]" in p for p in problems(saved, intermediate_size=48))
    assert problems(saved, num_attention_heads=3, num_key_value_heads=2)[0] == "layer 0: 3 query heads are not a multiple of 2 key-value heads"


def test_heterogeneous_layer_declared_per_layer_passes(tmp_path):
    """A layer with fewer key-value heads is fine when the config declares it per layer, and a problem when not."""
    model = tiny_model("llama")
    layer = model.model.layers[2].self_attn
    layer.k_proj = torch.nn.Linear(32, 8, bias=False)  # 1 key-value head of 8
    layer.v_proj = torch.nn.Linear(32, 8, bias=False)
    model.save_pretrained(tmp_path / "h")
    assert problems(tmp_path / "h", num_key_value_heads=[2, 2, 1, 2], num_attention_heads=4) == []
    assert problems(tmp_path / "h")[0].startswith("layer 2: self_attn.k_proj.weight is [8, 32], but the config states [16, 32]")


# Validate: export settings against the model, before any stage runs ----------------------------------------


def params_with(*overrides: str):
    return parse_params(compose(REPO / "conf", list(overrides)))


def test_validate_refuses_export_of_an_architecture_without_writer():
    params = params_with("export.enabled=true", "export.quantization=q8_0")
    with pytest.raises(ConfigError, match="architecture 'qwen2' has no GGUF writer in layerfold"):
        check(params, ModelFacts("qwen2", 30, 8192, 49152))
    check(params, ModelFacts("llama", 30, 8192, 49152))  # the default model: fine
    check(params_with(), ModelFacts("qwen2", 30, 8192, 49152))  # export off: nothing to refuse


def test_validate_refuses_source_quantisation_without_a_gguf_source():
    from layerfold.export.checks import export_problems

    params = params_with("model=stories260k", "export.enabled=true")
    found = export_problems(params, ModelFacts("llama", 5, 512, 512))
    assert len(found) == 1 and re.match("export.quantization=source .* model.source=llama2c is not a GGUF. Choose one of f32", found[0])
    assert export_problems(params_with("model=stories260k", "export.enabled=true", "export.quantization=f16"), ModelFacts("llama", 5, 512, 512)) == []


def test_validate_refuses_an_unknown_quantisation_name():
    with pytest.raises(ConfigError, match=r"export.quantization='q5_k' is not allowed: it must be one of source, f32, f16, bf16, q8_0, q4_0, q4_1"):
        params_with("export.quantization=q5_k")


def test_config_choices_match_the_writer():
    from layerfold.config import ExportConfig
    from layerfold.export import QUANTIZATIONS

    choices = next(f.metadata["choices"] for f in ExportConfig.__dataclass_fields__.values() if f.name == "quantization")
    assert tuple(choices) == QUANTIZATIONS


# The committed llama.cpp / transformers results and docs/export.md's tables generated from them ---------------


def test_docs_tables_are_generated_from_the_committed_results():
    """Every results/export/*.json has its table in docs/export.md, exactly as the verification script prints it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("verify_gguf_llamacpp", REPO / "scripts" / "verify_gguf_llamacpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docs = DOCS.read_text(encoding="utf-8")
    results = sorted((REPO / "results" / "export").glob("*.json"))
    assert results, "no committed results/export/*.json"
    for file in results:
        payload = json.loads(file.read_text())
        assert module.results_table(payload) in docs, f"docs/export.md lacks the table of {file.name} (scripts/verify_gguf_llamacpp.py --table {file})"
        for name, entry in payload["results"].items():
            if name == "source_gguf":
                continue
            assert all(entry["load_checks"].values()), (file.name, name, entry["load_checks"])
            # docs/export.md: llama.cpp and transformers agree to 0.01 % on F16 files, within 1 % on quantised files of
            # models that are not collapsed (perplexity < 1000), within 1.5 % on the collapsed ones
            gap = abs(entry["llama_cpp"]["perplexity"] / entry["transformers_gguf"]["perplexity"] - 1)
            collapsed = entry["transformers_checkpoint"]["perplexity"] >= 1000
            assert gap < (1e-4 if entry["export"]["file_type"] == "MOSTLY_F16" else 0.015 if collapsed else 0.01), (file.name, name, gap)
            if "round_trip" in entry:  # "all 272 tensors come back byte-identical"
                assert entry["round_trip"]["byte_identical"] == entry["round_trip"]["tensors"] == 272 and not entry["round_trip"]["differing"]
