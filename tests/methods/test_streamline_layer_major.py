"""LLM-Streamline's replacements under hardware=sequential: the same checkpoint and plan.json as resident.

The replacement is the window's first layer with some tensors given new values (a TensorInit in the
plan): resident compression applies it in place, layer-major compression when the planned layer is
built from the original shards. Both must write identical tensors, config and plan.json; the resident
model for transformer_layer and ffn must be the one built by hand (as before the init was a recipe).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_same_checkpoint, tiny_model
from test_streamline import _tokenizer, constructed_stats

from layerfold.execution import (
    ModelLayerLoader,
    PlanError,
    PlannedLayerLoader,
    WeightedLayerPlan,
)
from layerfold.methods import (
    MethodContext,
    check_layer_major,
    compress,
)
from layerfold.models import save_checkpoint
from layerfold.models.adapters import get_adapter
from layerfold.models.replacement import TensorInit
from layerfold.surgery import rdsc_paper, remove_layers
from layerfold.compression import compress_layer_major, compress_resident

QUIET = [1, 2]  # layers that add almost nothing: the chosen window is [1, 2] (num_remove=1 plus the replacement)
BLOCKS = torch.zeros(1, 4, dtype=torch.long)  # streamline reads only the statistics
SEQUENTIAL = {"mode": "sequential", "activations": "host", "logits_chunk": 13}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models only: one intra-op thread (see conftest.one_thread)."""


def method(replacement: str) -> dict:
    return {"name": "streamline", "num_remove": 1, "replacement": replacement}


@pytest.fixture
def checkpoint(tmp_path):
    """Factory: a tiny random model of ``family`` saved in float32, the model and its layer count."""

    def make(family: str):
        model = tiny_model(family)
        path = tmp_path / f"base-{family}"
        save_checkpoint(model, _tokenizer(), path, dtype=torch.float32)
        return path, model

    return make


def both_checkpoints(path, tmp_path, replacement: str, dtype: torch.dtype, seed: int) -> tuple[Path, Path]:
    """The compress stage's two paths on the same base, statistics and seed: the two output folders."""
    stats = constructed_stats(QUIET)
    for mode, run in (("resident", compress_resident), ("sequential", compress_layer_major)):
        extra = (SEQUENTIAL,) if mode == "sequential" else ()
        torch.manual_seed(1000 if mode == "resident" else 2000)  # the global RNG must not matter
        run(path, BLOCKS, stats, method(replacement), *extra, 2, CPU, dtype, torch.bfloat16, tmp_path / mode, seed=seed)
    return tmp_path / "resident", tmp_path / "sequential"


@pytest.mark.parametrize("replacement, family, dtype", [
    ("transformer_layer", "llama", torch.float32),
    ("ffn", "llama", torch.float32),
    ("ffn", "opt", torch.float32),  # an output projection with a bias
    ("swiglu", "llama", torch.float32),
    ("swiglu", "qwen2", torch.bfloat16),  # draws cast to the compute dtype first, then stored
])
def test_sequential_writes_the_resident_checkpoint(checkpoint, tmp_path, replacement, family, dtype):
    path, _ = checkpoint(family)
    resident_dir, our_dir = both_checkpoints(path, tmp_path, replacement, dtype, seed=7)
    ours, our_tensors, config = assert_same_checkpoint(resident_dir, our_dir)
    assert config["num_hidden_layers"] == 3
    resident = {p.name: p for p in resident_dir.iterdir()}
    plan = json.loads(ours["plan.json"].read_text())
    assert plan == json.loads(resident["plan.json"].read_text())
    details = plan["details"]
    assert (details["window"], details["replacement_layer"], details["needs_training"]) == ([1, 2], 1, True)
    assert details["attention_free_layers"] == ([] if replacement == "transformer_layer" else [1])
    assert plan["layers"][1]["stands_for"] == [1, 2] and plan["layers"][1]["coefficients"] == [1.0, 0.0]
    assert ("init" in plan["layers"][1]) == (replacement != "transformer_layer")
    output = get_adapter(family).attn_output
    zero_out = [k for k in our_tensors if k.startswith(f"{get_adapter(family).layers}.1.{output}.")]
    assert zero_out and all(bool(torch.count_nonzero(our_tensors[k]) == 0) == (replacement != "transformer_layer") for k in zero_out)


def test_swiglu_draws_from_the_seed_not_the_global_rng(checkpoint, tmp_path):
    """The FFN of the replacement is normal(0, initializer_range) from a generator seeded with runtime.seed."""
    path, dense = checkpoint("llama")

    def replacement_layer(seed: int, global_seed: int) -> dict:
        model = copy.deepcopy(dense)
        torch.manual_seed(global_seed)
        compress(MethodContext(model, None, BLOCKS, constructed_stats(QUIET), seed=seed), method("swiglu"))
        return {k: v.clone() for k, v in model.model.layers[1].state_dict().items()}

    layer = replacement_layer(seed=5, global_seed=0)
    assert all(torch.equal(t, layer[k]) for k, t in replacement_layer(seed=5, global_seed=123).items())
    assert not torch.equal(replacement_layer(seed=6, global_seed=0)["mlp.gate_proj.weight"], layer["mlp.gate_proj.weight"])
    generator = torch.Generator().manual_seed(5)
    std = dense.config.initializer_range
    for name in ("gate_proj", "up_proj", "down_proj"):  # drawn in the adapter's MLP order from one generator
        expected = torch.empty(layer[f"mlp.{name}.weight"].shape).normal_(0.0, std, generator=generator)
        assert torch.equal(layer[f"mlp.{name}.weight"], expected), name
    assert torch.equal(layer["post_attention_layernorm.weight"], torch.ones(32))
    assert torch.count_nonzero(layer["self_attn.o_proj.weight"]) == 0
    untouched = dense.model.layers[1].state_dict()
    for key in ("self_attn.q_proj.weight", "input_layernorm.weight"):
        assert torch.equal(layer[key], untouched[key]), key


@pytest.mark.parametrize("replacement, family", [("transformer_layer", "llama"), ("ffn", "llama"), ("ffn", "opt")])
def test_resident_model_is_the_one_built_by_hand(replacement, family):
    """transformer_layer = layer 1 unchanged, ffn = layer 1 with a zero output projection; layer 2 deleted."""
    dense = tiny_model(family)
    by_hand = copy.deepcopy(dense)
    if replacement == "ffn":
        with torch.no_grad():
            out = get_adapter(family).get_layers(by_hand)[1].get_submodule(get_adapter(family).attn_output)
            out.weight.zero_()
            out.bias.zero_() if out.bias is not None else None
    remove_layers(by_hand, [2])
    model = copy.deepcopy(dense)
    compress(MethodContext(model, None, BLOCKS, constructed_stats(QUIET)), method(replacement))
    ours, theirs = model.state_dict(), by_hand.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, by_hand(ids).logits)


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16)])
def test_mlp_replacement_layer_by_layer_writes_the_resident_checkpoint(checkpoint, tmp_path, family, dtype):
    """The ReLU-MLP replacement, drawn from runtime.seed whatever the global RNG did, travels in the plan and lands in
    the side file: the same stock files, the same side file tensor for tensor, the same plan.json as resident."""
    from safetensors.torch import load_file

    from layerfold.models import load_checkpoint
    from layerfold.models.replacement import SIDE_FILE

    path, _ = checkpoint(family)
    resident_dir, our_dir = both_checkpoints(path, tmp_path, "mlp", dtype, seed=7)
    _, _, config = assert_same_checkpoint(resident_dir, our_dir)
    assert config["num_hidden_layers"] == 2  # the stock part: the replacement is in the side file
    assert json.loads((our_dir / "plan.json").read_text()) == json.loads((resident_dir / "plan.json").read_text())
    ours, theirs = load_file(our_dir / SIDE_FILE), load_file(resident_dir / SIDE_FILE)
    assert sorted(ours) == sorted(theirs) and any(k.endswith("fc1.weight") for k in ours)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    model, _ = load_checkpoint(our_dir, "cpu", torch.float32)  # the resident loader puts the replacement back
    assert model.config.num_hidden_layers == 3 and type(model.model.layers[1].mlp).__name__ == "ReluMLP"


def test_mlp_under_sequential_is_refused_by_validate_for_the_later_stages():
    from conftest import REPO

    from layerfold.config import ConfigError, compose, parse_params
    from layerfold.validation import check

    check_layer_major(method("mlp"))  # compress itself runs layer by layer
    with pytest.raises(ConfigError, match=r"replacement=mlp.*side file.*recover and evaluate.*hardware=resident"):
        check(parse_params(compose(REPO / "conf", ["method=streamline", "method.replacement=mlp", "hardware=sequential"])), None)
    for replacement in ("none", "transformer_layer", "ffn", "swiglu"):
        check(parse_params(compose(REPO / "conf", ["method=streamline", f"method.replacement={replacement}", "hardware=sequential"])), None)


def test_layer_major_measurements_see_the_replacement():
    """A planned stand-in is built with its init in trials too: the layer-major NLL equals the resident one.

    The first measurement comes after the edit (plan bases [0, 1, 3] over a 3-layer skeleton): the layer
    call arguments are still probed on the original stack.
    """
    blocks = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    resident = MethodContext(tiny_model("llama"), None, blocks, constructed_stats(QUIET), batch_size=2, seed=4)
    ours = MethodContext.layer_major(ModelLayerLoader(tiny_model("llama")), None, blocks, SEQUENTIAL, "cpu", torch.float32,
                                     constructed_stats(QUIET), batch_size=2, seed=4)
    plans = [compress(ctx, method("swiglu")) for ctx in (resident, ours)]
    assert plans[0] == plans[1]
    nll = resident.calibration_nll()
    assert ours.calibration_nll() == pytest.approx(nll, rel=1e-6)
    plain = MethodContext(tiny_model("llama"), None, blocks, batch_size=2)
    plain.remove([2])  # the same stack without the re-initialisation: a tiny random model, so the gap is small but far above rounding
    assert abs(plain.calibration_nll() - nll) > 100 * 1e-6 * nll


def test_plan_json_rebuilds_the_stand_in_and_merging_it_is_unknown():
    """A stand-in's recipe survives plan.json (coefficients and init); a merge that folds it in has no known weights."""
    model = tiny_model("llama")
    init = TensorInit(zero=("self_attn.o_proj",), normal=("mlp.up_proj",), ones=("post_attention_layernorm",), std=0.5, seed=9)
    plan = WeightedLayerPlan(4)
    plan.stand_in(1, [2], init)
    loader = ModelLayerLoader(model)
    from_memory, from_json = PlannedLayerLoader(loader, plan), PlannedLayerLoader(loader, json.loads(json.dumps(plan.to_json())))
    for index in range(3):
        a, b = from_memory.load_layer(index, "cpu", torch.float32), from_json.load_layer(index, "cpu", torch.float32)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), index
    layer = from_json.load_layer(1, "cpu", torch.float32)
    assert torch.count_nonzero(layer["self_attn.o_proj.weight"]) == 0 and layer["mlp.up_proj.weight"].std() > 0.4
    assert torch.equal(layer["mlp.gate_proj.weight"], model.model.layers[1].mlp.gate_proj.weight)
    with pytest.raises(PlanError, match="already re-initialised"):
        plan.stand_in(1, [], init)
    plan.merge(0, [1], rdsc_paper)
    assert plan.coefficients[0] is None and plan.inits[0] is None
    with pytest.raises(PlanError, match="no merge coefficients"):
        PlannedLayerLoader(loader, plan.to_json())


def test_an_init_naming_a_missing_module_is_an_error():
    with pytest.raises(ValueError, match="mlp.fc9"):
        TensorInit(normal=("mlp.fc9",)).apply_to(tiny_model("llama").model.layers[0])
