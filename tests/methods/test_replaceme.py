"""ReplaceMe: the fitted map recovers a block that is linear, streams, runs layer by layer, and refuses what it cannot fit."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from layerfold.capture.linear_fit import NormalEquations, SingularSystemError
from layerfold.execution import ModelLayerLoader, PlannedLayerLoader
from layerfold.methods import MethodContext, compress
from layerfold.surgery import LayerSurgeryError

SEQUENTIAL = {"mode": "sequential", "activations": "device"}


def linear_block_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """A GPT-NeoX (float64) whose layer 1 is exactly linear in the part of its input that layer 0's MLP writes.

    - Layer 0's attention writes nothing, so the stream entering its MLP is the token embedding ``R``; the
      embeddings lie in a 5-dimensional subspace ``S`` of zero-sum vectors. Its ReLU MLP output ``M`` spans
      every direction.
    - Layer 1's attention writes nothing. Its LayerNorm has eps = 1e8, far above the stream's variance, so
      it is ``P_c h / sqrt(eps)`` (``P_c`` removes the mean) to ~1e-12; its ReLU sees ``1 + (small)`` and
      passes it through, and the constant is cancelled by ``fc2``'s bias. So layer 1 adds ``h P_c G`` with
      ``G = W1ᵀ W2ᵀ / sqrt(eps)``, and ``W1`` ignores ``S``: ``R G = 0``.

    After layer 1 the stream is ``R + M + M P_c G``: removing layer 1 and folding ``T = I + P_c G`` into
    layer 0's MLP output reproduces it. Returns the model and ``T``.
    """
    torch.manual_seed(0)
    d, ffn, k, eps = 16, 64, 5, 1e8
    config = GPTNeoXConfig(vocab_size=128, hidden_size=d, num_hidden_layers=3, num_attention_heads=2, intermediate_size=ffn,
                           max_position_embeddings=64, layer_norm_eps=eps, hidden_act="relu", use_parallel_residual=False)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    basis = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64) - torch.randn(1, k, dtype=torch.float64))[0]
    basis = basis - basis.mean(0, keepdim=True)  # zero-sum columns ...
    basis = torch.linalg.qr(basis)[0]  # ... orthonormal, still zero-sum
    on_s = basis @ basis.T
    with torch.no_grad():
        model.gpt_neox.embed_in.weight.copy_(1e-2 * torch.randn(128, k, dtype=torch.float64) @ basis.T)
        l0, l1, l2 = model.gpt_neox.layers
        for layer in (l0, l1, l2):
            layer.attention.dense.weight.zero_()
            layer.attention.dense.bias.zero_()
        # layer 0: a ReLU MLP in its nonlinear regime, reading R / sqrt(eps)
        l0.mlp.dense_h_to_4h.weight.copy_(eps**0.5 * torch.randn(ffn, d, dtype=torch.float64) * 10)
        l0.mlp.dense_h_to_4h.bias.zero_()
        l0.mlp.dense_4h_to_h.weight.copy_(1e-2 * torch.randn(d, ffn, dtype=torch.float64))
        l0.mlp.dense_4h_to_h.bias.copy_(1e-2 * torch.randn(d, dtype=torch.float64))
        # layer 1: linear; W1 blind to S
        w1 = 0.1 * torch.randn(ffn, d, dtype=torch.float64) @ (torch.eye(d, dtype=torch.float64) - on_s)
        w2 = torch.randn(d, ffn, dtype=torch.float64) / ffn**0.5
        l1.mlp.dense_h_to_4h.weight.copy_(eps**0.5 * w1)
        l1.mlp.dense_h_to_4h.bias.fill_(1.0)
        l1.mlp.dense_4h_to_h.weight.copy_(w2)
        l1.mlp.dense_4h_to_h.bias.copy_(-w2.sum(1))
    centre = torch.eye(d, dtype=torch.float64) - 1.0 / d
    return model, torch.eye(d, dtype=torch.float64) + centre @ w1.T @ w2.T


def blocks(n: int = 8, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def fold_matrix(ctx: MethodContext, layer: int = 0):
    return ctx.plan.inits[layer].matrix


def test_a_linear_block_is_recovered_exactly(one_thread):
    model, expected = linear_block_model()
    calibration = blocks()
    with torch.no_grad():
        dense_logits = model(calibration).logits
    ctx = MethodContext(model, None, calibration, batch_size=2)
    plan = compress(ctx, {"name": "replaceme", "num_remove": 1, "start": 1})
    fitted = fold_matrix(ctx)
    assert torch.allclose(fitted, expected, rtol=0, atol=1e-8 * expected.abs().max()), (fitted - expected).abs().max()
    assert plan["details"]["relative_residual"] < 1e-12 < plan["details"]["relative_residual_without_map"]
    assert plan["layers"][0]["stands_for"] == [0, 1] and len(plan["layers"]) == 2
    with torch.no_grad():
        pruned_logits = model(calibration).logits  # two layers now; layer 0 carries T
    assert torch.allclose(pruned_logits, dense_logits, rtol=0, atol=1e-7), (pruned_logits - dense_logits).abs().max()


def test_layer_major_fits_the_same_map_and_builds_the_same_layer(one_thread):
    calibration = blocks()
    resident = tiny_model("llama").double()
    ctx = MethodContext(resident, None, calibration, batch_size=2)
    plan = compress(ctx, {"name": "replaceme", "num_remove": 2})
    source = tiny_model("llama").double()
    lm_ctx = MethodContext.layer_major(ModelLayerLoader(source), None, calibration, SEQUENTIAL, "cpu", torch.float64, batch_size=2)
    lm_plan = compress(lm_ctx, {"name": "replaceme", "num_remove": 2})
    assert lm_plan["details"]["removed_layers"] == plan["details"]["removed_layers"]
    assert torch.allclose(fold_matrix(lm_ctx), fold_matrix(ctx), rtol=1e-9, atol=1e-10)
    fold = plan["details"]["fold_layer"]
    built = PlannedLayerLoader(ModelLayerLoader(source), lm_ctx.plan).load_layer(fold, "cpu", torch.float64)
    edited = resident.model.layers[fold].state_dict()
    assert set(built) == set(edited)
    for key in built:
        assert torch.allclose(built[key], edited[key], rtol=1e-9, atol=1e-12), key
    untouched = source.model.layers[fold].state_dict()
    assert not torch.equal(built["mlp.down_proj.weight"], untouched["mlp.down_proj.weight"])
    assert torch.equal(built["mlp.up_proj.weight"], untouched["mlp.up_proj.weight"])


def test_the_sums_do_not_depend_on_how_the_calibration_is_batched(one_thread):
    calibration = blocks()
    folds = []
    for batch_size in (1, 8):
        ctx = MethodContext(tiny_model("llama").double(), None, calibration, batch_size=batch_size)
        compress(ctx, {"name": "replaceme", "num_remove": 1, "start": 2})
        folds.append(fold_matrix(ctx, 1))
    assert torch.allclose(folds[0], folds[1], rtol=1e-10, atol=1e-12)


def test_normal_equations_match_a_direct_least_squares():
    generator = torch.Generator().manual_seed(1)
    x, t = torch.randn(200, 6, generator=generator, dtype=torch.float64), torch.randn(6, 6, generator=generator, dtype=torch.float64)
    y = x @ t + 1e-3 * torch.randn(200, 6, generator=generator, dtype=torch.float64)
    equations = NormalEquations(6)
    for part_x, part_y in zip(x.split(37), y.split(37)):
        equations.add(part_x.float(), part_y.float())  # float32 activations, float64 products and sums
    direct = torch.linalg.lstsq(x.float().double(), y.float().double()).solution
    assert torch.allclose(equations.solve(), direct, atol=1e-9)
    assert torch.allclose(equations.solve(inverse=True), direct, atol=1e-9)
    assert equations.tokens == 200


def test_too_few_tokens_for_the_system_are_refused_before_any_forward(one_thread):
    model = tiny_model("llama")  # hidden size 32
    ctx = MethodContext(model, None, blocks(n=2, seq=8), batch_size=2)  # 16 tokens
    ctx.dense_stats()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SingularSystemError, match=r"16 calibration tokens cannot determine a 32 x 32 .*num_blocks.*method.ridge"):
        compress(ctx, {"name": "replaceme", "num_remove": 1})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing edited
    compress(MethodContext(tiny_model("llama"), None, blocks(n=2, seq=8)), {"name": "replaceme", "num_remove": 1, "ridge": 1e-3})


def test_a_rank_deficient_system_names_its_eigenvalues():
    equations = NormalEquations(4)
    x = torch.zeros(10, 4)
    x[:, :2] = torch.randn(10, 2)  # two dead channels
    equations.add(x, x)
    with pytest.raises(SingularSystemError, match="not positive definite.*span fewer than 4 directions"):
        equations.solve()


@pytest.mark.parametrize("start", [0, 3, 7])
def test_a_window_the_model_does_not_have_is_refused(start, one_thread):
    ctx = MethodContext(tiny_model("llama"), None, blocks())  # 4 layers: a 2-layer block can start at 1 or 2
    with pytest.raises(LayerSurgeryError, match=r"method.start must lie in 1..2") if start else pytest.raises(Exception, match="method.start=0"):
        compress(ctx, {"name": "replaceme", "num_remove": 2, "start": start})


def test_cosine_objective_lowers_the_cosine_distance_from_the_identity(one_thread):
    model, _ = linear_block_model()
    ctx = MethodContext(model, None, blocks(), batch_size=4, seed=3)
    plan = compress(ctx, {"name": "replaceme", "num_remove": 1, "start": 1, "objective": "cosine", "epochs": 3, "lr": 1e-2, "batch_tokens": 32})
    curve = plan["details"]["cosine_loss"]
    assert len(curve) == 3 and curve[-1] < curve[0]
    assert plan["details"]["relative_residual"] < plan["details"]["relative_residual_without_map"]
