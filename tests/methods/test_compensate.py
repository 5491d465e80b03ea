"""Compensation after removal: Prune&Comp folds into stock weights, LinearPatch rides in a side file; both refuse merges."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_model
from safetensors import safe_open
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from layerfold.capture import LayerBoundaries
from layerfold.compensate import CompensationError, Interface, compress_and_compensate, interfaces
from layerfold.compensate.hadamard import HadamardError, hadamard
from layerfold.compensate.linear_patch import channel_scale, patch_matrix
from layerfold.execution import ModelLayerLoader, PlannedLayerLoader, SafetensorsLayerLoader
from layerfold.execution.plan import WeightedLayerPlan
from layerfold.methods import MethodContext
from layerfold.models import load_checkpoint, save_checkpoint
from layerfold.models.facts import ModelSourceError
from layerfold.models.patches import ATTRIBUTE, PATCH_FILE

SEQUENTIAL = {"mode": "sequential", "activations": "device"}


def blocks(n: int = 8, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(0))


def sharp_llama() -> torch.nn.Module:
    """The tiny Llama in float64 with a negligible RMSNorm epsilon: its norms are then exactly scale-invariant."""
    config = TINY_CONFIGS["llama"]()
    config.rms_norm_eps = 1e-30
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().eval()


def boundaries(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """The pre-norm residual stream at every layer boundary (HF's last hidden state is after the final norm)."""
    with torch.no_grad(), LayerBoundaries(model, detach_to=torch.float64) as hooks:
        model(ids)
    return list(hooks.states)


def test_interfaces_follow_the_removed_runs():
    plan = WeightedLayerPlan(10)
    plan.remove([0, 3, 4, 9])
    assert interfaces(plan) == [Interface(0, 0, 1), Interface(2, 3, 5), Interface(6, 9, 10)]  # kept: 1, 2, 5, 6, 7, 8
    assert interfaces(WeightedLayerPlan(4)) == []


@pytest.mark.parametrize("method", [{"name": "gromov", "num_remove": 2}, {"name": "gromov", "num_remove": 1}, {"name": "drop_last", "num_remove": 1}])
def test_prune_comp_is_a_rescale_of_the_stream_after_each_interface(method, one_thread):
    """The folded model equals the removal with the stream multiplied by alpha at the interface (norms are scale-invariant)."""
    calibration = blocks()
    model = sharp_llama()
    ctx = MethodContext(model, None, calibration)
    plan = compress_and_compensate(ctx, method, {"name": "prune_comp", "measure": "dense"})
    removed = plan["removed"]
    alpha = plan["compensation"]["alphas"][0]
    reference = sharp_llama()
    dense_norms = [h.norm(dim=-1).mean().item() for h in boundaries(reference, calibration)]
    run = (removed[0], removed[-1] + 1)
    assert alpha == pytest.approx(dense_norms[run[1]] / dense_norms[run[0]], rel=1e-5)
    # the same removal, the stream scaled by alpha where it enters the interface
    from layerfold.surgery import remove_layers

    remove_layers(reference, removed)
    position = plan["compensation"]["interfaces"][0]["position"]
    if position < len(reference.model.layers):
        reference.model.layers[position].register_forward_pre_hook(lambda m, a, k: ((a[0] * alpha, *a[1:]), k) if a else (a, {**k, "hidden_states": k["hidden_states"] * alpha}), with_kwargs=True)
    with torch.no_grad():
        expected, got = reference(calibration).logits, model(calibration).logits
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    if position == len(reference.model.layers):  # after the last layer: nothing to rescale, nothing changed
        assert all(entry.get("init") is None for entry in plan["layers"])


def test_prune_comp_measured_on_the_compressed_model_matches_layer_major(one_thread):
    calibration = blocks()
    resident = tiny_model("llama").double()
    ctx = MethodContext(resident, None, calibration, batch_size=2)
    plan = compress_and_compensate(ctx, {"name": "shortgpt", "num_remove": 2}, {"name": "prune_comp"})
    source = tiny_model("llama").double()
    lm_ctx = MethodContext.layer_major(ModelLayerLoader(source), None, calibration, SEQUENTIAL, "cpu", torch.float64, batch_size=2)
    lm_plan = compress_and_compensate(lm_ctx, {"name": "shortgpt", "num_remove": 2}, {"name": "prune_comp"})
    assert lm_plan["compensation"]["alphas"] == pytest.approx(plan["compensation"]["alphas"], rel=1e-9)
    built = PlannedLayerLoader(ModelLayerLoader(source), lm_ctx.plan)
    for k, layer in enumerate(resident.model.layers):
        state = built.load_layer(k, "cpu", torch.float64)
        assert all(torch.allclose(state[key], value, atol=1e-12) for key, value in layer.state_dict().items())
    scaled = [entry for entry in plan["layers"] if entry.get("init")]
    assert scaled and all(entry["init"]["write_scale"] == ["self_attn.o_proj", "mlp.down_proj"] for entry in scaled)


def test_linear_patch_scales_rotated_channels_to_the_dense_magnitudes(one_thread):
    calibration = blocks()
    model = tiny_model("llama").double()
    ctx = MethodContext(model, None, calibration)
    plan = compress_and_compensate(ctx, {"name": "gromov", "num_remove": 2}, {"name": "linear_patch"})
    (interface,) = plan["compensation"]["interfaces"]
    before, after = interface["removed"][0], interface["removed"][-1] + 1
    dense = boundaries(tiny_model("llama").double(), calibration)
    rotation = hadamard(32)
    magnitude = lambda h: (h @ rotation).abs().mean(1)  # noqa: E731  per sequence, [sequences, d]
    scale = magnitude(dense[after]).mean(0) / magnitude(dense[before]).mean(0)
    patch = getattr(model, ATTRIBUTE).matrices()[interface["position"]].double()
    assert torch.allclose(patch, rotation @ torch.diag(scale) @ rotation.T, atol=1e-6)
    assert plan["compensation"]["stock_checkpoint"] is False


def test_a_patched_checkpoint_saves_stock_files_and_reloads_its_patches(tmp_path, one_thread):
    calibration = blocks()
    model = tiny_model("llama")
    compress_and_compensate(MethodContext(model, None, calibration), {"name": "shortgpt", "num_remove": 2}, {"name": "linear_patch"})
    with torch.no_grad():
        patched_logits = model(calibration).logits
    out = tmp_path / "compressed"
    save_checkpoint(model, PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))), out)
    assert (out / PATCH_FILE).exists()
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert not [k for k in handle.keys() if ATTRIBUTE in k]  # the stock files hold the pruned model alone
    assert hasattr(model, ATTRIBUTE)  # and the saved model keeps its patches
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # a stock loader: no patch
    with torch.no_grad():
        assert not torch.allclose(plain(calibration).logits, patched_logits, atol=1e-4)
    reloaded, _ = load_checkpoint(out)
    with torch.no_grad():
        assert torch.allclose(reloaded(calibration).logits, patched_logits, atol=1e-5)
    with pytest.raises(ModelSourceError, match="LinearPatch.*hardware=resident"):
        SafetensorsLayerLoader(out)


@pytest.mark.parametrize(("method", "why"), [({"name": "laco", "interval": 1, "merge_layers": 2, "threshold": 0.0, "target_layers": 3}, "merges"),
                                             ({"name": "replaceme", "num_remove": 1}, "folds")])
def test_compensation_refuses_a_method_that_changed_kept_layers(method, why, one_thread):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompensationError, match=rf"compensate=prune_comp.*{why}.*compensate=none"):
        compress_and_compensate(MethodContext(model, None, blocks()), method, {"name": "prune_comp"})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any edit


def test_the_plan_is_checked_after_the_method_too(one_thread, monkeypatch):
    import layerfold.compensate as compensate

    monkeypatch.setattr(compensate, "compensation_problems", lambda *args: [])  # a merging method validate does not know ...
    model = tiny_model("llama")
    with pytest.raises(CompensationError, match="merged or replaced layers instead of removing them. Nothing was written"):
        compress_and_compensate(MethodContext(model, None, blocks()), {"name": "streamline", "num_remove": 1}, {"name": "prune_comp"})


def test_hadamard_matrices_are_orthonormal_and_unknown_orders_are_refused():
    for n in (1, 2, 12, 20, 36, 64, 576, 960):
        h = hadamard(n)
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose((h * n**0.5).abs(), torch.ones(n, n, dtype=torch.float64))
    with pytest.raises(HadamardError, match="rotation=none"):
        hadamard(100)


def test_channel_scale_estimates():
    source = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)
    target = torch.tensor([[2.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    assert torch.allclose(channel_scale(target, source, "ratio_of_means"), torch.tensor([1.25, 2.0], dtype=torch.float64))
    assert torch.allclose(channel_scale(target, source, "mean_of_ratios"), torch.tensor([1.5, 2.0], dtype=torch.float64))
    assert torch.equal(patch_matrix(torch.tensor([2.0, 3.0], dtype=torch.float64), None), torch.diag(torch.tensor([2.0, 3.0], dtype=torch.float64)))
