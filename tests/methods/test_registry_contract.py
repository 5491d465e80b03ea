"""The contract every registered method keeps (docs/new_method.md): one file and one config.

For each name in the registry: ``conf/method/<name>.yaml`` exists, composes, names exactly its dataclass's fields and
validates against it; the method compresses a tiny random Llama (4 layers) to the requested depth through the
compress stage's own function, writing a checkpoint of that depth, reloadable with plain ``from_pretrained``, and a
plan whose layers stand for original layers; it declares its capabilities (``MethodCapabilities``), and where the
declaration says these settings run layer by layer, the layer-by-layer compress gives the same plan and the same tensors.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO
from layerfold.config import compose
from layerfold.methods import EDITS, REGISTRY, CaptureReads, MethodCapabilities, get_method
from layerfold.models import save_checkpoint
from layerfold.models.facts import facts_from_config
from layerfold.models.replacement import attach_side_layers
from layerfold.models.tiny import tiny_config, tiny_model, tiny_tokenizer
from layerfold.validation import check
from layerfold.compression import compress_layer_major, compress_resident

get_method({"name": "shortgpt"})  # imports every module of layerfold.methods, which fills the registry
METHODS = sorted(REGISTRY)
LAYERS = 4  # layerfold.models.tiny's depth
# Settings that make a method reach 3 of the tiny model's 4 layers in a fraction of a second; a method with
# ``num_remove`` needs no entry (num_remove=1 is used).
TINY = {
    "laco": ["method.merge_layers=2", "method.threshold=-1.0", "method.interval=1", "method.target_layers=3"],
    "mka": ["method.num_remove=1", "method.k_entropy=3", "method.n_neighbors=3"],
    "come_p": ["method.num_remove=1", "method.granularity=2"],
}


def _overrides(name: str) -> list[str]:
    if name in TINY:
        return [f"method={name}", *TINY[name]]
    fields = {f.name for f in dataclasses.fields(REGISTRY[name].config)}
    assert "num_remove" in fields, f"method={name} has no num_remove: add its tiny-model settings to TINY in this test"
    return [f"method={name}", "method.num_remove=1"]


def _requested_depth(method: dict) -> int:
    return method["target_layers"] if method.get("target_layers") is not None else LAYERS - method["num_remove"]


def _blocks() -> torch.Tensor:
    return torch.randint(4, 99, (8, 12), generator=torch.Generator().manual_seed(1))


def test_the_registry_is_every_method_config():
    assert METHODS == sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


@pytest.mark.parametrize("name", METHODS)
def test_config_yaml_is_the_dataclass(name):
    raw = yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())
    fields = [f.name for f in dataclasses.fields(REGISTRY[name].config)]
    assert raw["name"] == name
    assert set(raw) == set(fields), f"conf/method/{name}.yaml keys differ from {REGISTRY[name].config.__name__}: {set(raw) ^ set(fields)}"
    spec, cfg = get_method(compose(REPO / "conf", [f"method={name}"])["method"])
    assert spec.name == name and OmegaConf.to_container(cfg) == raw  # the YAML validates, every value as written


@pytest.mark.parametrize("name", METHODS)
def test_declares_its_capabilities(name):
    """Every method states what it does and needs; the declared values are of the kinds their readers expect."""
    caps = REGISTRY[name].capabilities
    assert isinstance(caps, MethodCapabilities) and isinstance(caps.reads, CaptureReads)
    _, cfg = get_method(compose(REPO / "conf", [f"method={name}"])["method"])  # the YAML's settings
    assert caps.edit_of(cfg) in EDITS
    assert caps.edit_of(cfg) == "remove" or caps.edit_description(cfg)
    assert caps.layer_major_blocker(cfg) is None or isinstance(caps.layer_major_blocker(cfg), str)
    assert set(caps.reads.statistics) <= {"cosine", "last_token_angular", "sample_features"}
    distance = caps.reads.distance(cfg)
    assert distance is None or (isinstance(distance, int) and distance >= 1)
    assert distance is None or "cosine" in caps.reads.statistics  # a cosine distance is read from the cosine statistics
    side = caps.side_layers(cfg)
    assert side is None or (len(side) == 2 and all(isinstance(part, str) and part for part in side))
    assert isinstance(caps.trains(cfg), bool)


# Dataclass defaults that still differ from the YAML (the pipeline always composes the YAML, so they never run):
# LaCo's dataclass keeps the released notebook's unbounded loop (target_layers=None), its YAML the paper's 22-layer target.
DEFAULTS_DIFFERING = {"laco": {"target_layers"}}


@pytest.mark.parametrize("name", METHODS)
def test_dataclass_defaults_are_the_yaml_values(name):
    defaults = OmegaConf.to_container(OmegaConf.structured(REGISTRY[name].config))
    raw = yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())
    differing = {k for k in raw if defaults.get(k) != raw[k]}
    assert differing == DEFAULTS_DIFFERING.get(name, set()), {k: (defaults.get(k), raw[k]) for k in differing}


@pytest.mark.parametrize("name", METHODS)
def test_compresses_a_tiny_llama_to_the_requested_depth(name, tmp_path, one_thread):
    params = OmegaConf.create(compose(REPO / "conf", [*_overrides(name), "model=stories260k", "data.calibration.seq_len=12",
                                                      "eval.perplexity.seq_len=128"]))
    check(params, facts_from_config(tiny_config("llama")), f"method={name} on the tiny llama")  # validate accepts it
    dense = tmp_path / "dense"
    save_checkpoint(tiny_model("llama"), tiny_tokenizer(), dense, dtype=torch.float32)
    out = tmp_path / "compressed"
    plan, _, _ = compress_resident(dense, _blocks(), None, params.method, 4, torch.device("cpu"), torch.float32, torch.float32, out)

    depth = _requested_depth(plan["method"])
    assert plan["original_layers"] == LAYERS and len(plan["layers"]) == depth
    covered = [k for layer in plan["layers"] for k in layer["stands_for"]]
    assert covered == sorted(set(covered)) and set(covered) | set(plan["removed"]) == set(range(LAYERS))
    assert all(layer["base"] in layer["stands_for"] for layer in plan["layers"])
    assert json.loads((out / "plan.json").read_text()) == plan
    model = attach_side_layers(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), out)
    assert model.config.num_hidden_layers == len(model.model.layers) == depth
    with torch.no_grad():
        assert torch.isfinite(model(_blocks()[:1]).logits).all()

    spec, cfg = get_method(plan["method"])
    if spec.capabilities.layer_major_blocker(cfg) is None and spec.capabilities.side_layers(cfg) is None:
        layered, _, _ = compress_layer_major(dense, _blocks(), None, params.method, params.hardware, 4, torch.device("cpu"),
                                             torch.float32, torch.float32, tmp_path / "sequential")
        assert _comparable(layered) == _comparable(plan)
        ours, theirs = load_file(out / "model.safetensors"), load_file(tmp_path / "sequential" / "model.safetensors")
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _comparable(plan: dict) -> dict:
    """A plan without its details and seal, and without the digest of a fitted fold's float64 solution (ReplaceMe: the
    layer-by-layer normal equations sum in another order; the saved float32 tensors are compared exactly instead)."""
    layers = [{**layer, "init": {k: v for k, v in layer["init"].items() if k != "sha256_16"}} if "init" in layer else layer
              for layer in plan["layers"]]
    return {**{k: v for k, v in plan.items() if k not in ("details", "checkpoint")}, "layers": layers}
