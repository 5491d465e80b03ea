"""MKA on tiny random Llamas (CPU, seconds)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import layerfold.methods.mka as mka_module
from layerfold.capture import capture_statistics
from layerfold.config import ConfigError
from layerfold.methods import MethodContext, compress
from layerfold.methods.mka import MKAConfig, layer_similarity, merge_alpha, most_similar_adjacent_pair, normalise_by_diagonal, self_similarity
from layerfold.scoring.manifold import npib_similarity

VOCAB = 64
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls: intra-op threads only add barrier waits (tens of ms per op on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # distinct norms per layer, so "norms kept from the base" is observable
        for i, layer in enumerate(model.model.layers):
            for j, name in enumerate(NORMS):
                layer.get_submodule(name).weight.copy_(1.0 + 0.1 * i + 0.01 * j + 0.001 * torch.arange(16))
    return model


def blocks(n: int = 32, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))


def context(model, n: int = 32) -> MethodContext:
    return MethodContext(model, tokenizer=None, calibration=blocks(n), stats=None, batch_size=4)


def layer_weights(model) -> list[dict[str, torch.Tensor]]:
    return [
        {name: p.detach().clone() for name, p in layer.named_parameters()} for layer in model.model.layers
    ]


def assert_merged(model, before, l: int, alpha: float) -> None:
    merged = dict(model.model.layers[l].named_parameters())
    for name in LINEARS:
        key = f"{name}.weight"
        w_l, w_m = before[l][key], before[l + 1][key]
        assert not torch.equal(merged[key], w_l) and not torch.equal(merged[key], w_m), key
        assert torch.equal(merged[key], alpha * w_l + (1.0 - alpha) * w_m), key
    for name in NORMS:
        assert torch.equal(merged[f"{name}.weight"], before[l][f"{name}.weight"]), name


def hand_similarity(matrix: np.ndarray, calls: list):
    def fake(features, cfg, device="cpu"):
        calls.append(np.array(features))
        return {"similarity": matrix, "raw": matrix}

    return fake


# Merge mechanics ------------------------------------------------------------------------------


def test_fused_weights_are_written(monkeypatch) -> None:
    model = tiny_llama()
    before = layer_weights(model)
    ctx = context(model)
    expected_features = capture_statistics(model, ctx.calibration, 4, None).sample_features[1:]
    hand = np.array([[1.0, 0.3, 0.2, 0.1], [0.3, 1.0, 0.7, 0.2], [0.2, 0.7, 1.0, 0.4], [0.1, 0.2, 0.4, 1.0]])
    calls: list = []
    monkeypatch.setattr(mka_module, "layer_similarity", hand_similarity(hand, calls))

    plan = compress(ctx, {"name": "mka", "num_remove": 1})

    # The manifold sees the layer outputs, one row per calibration sample.
    assert len(calls) == 1 and calls[0].shape == (4, 32, 16)
    np.testing.assert_allclose(calls[0], expected_features.numpy(), rtol=1e-5, atol=1e-6)
    step = plan["details"]["steps"][0]
    assert step["pair"] == [1, 2] and step["original_layers"] == [[1], [2]] and step["merged_group"] == [1, 2]
    assert step["alpha"] == 0.7
    assert_merged(model, before, 1, step["alpha"])
    for i_new, i_old in ((0, 0), (2, 3)):  # the other layers are untouched
        for key, value in model.model.layers[i_new].named_parameters():
            assert torch.equal(value, before[i_old][key])
    assert model.config.num_hidden_layers == 3 and ctx.num_layers == 3
    assert ctx.plan.groups == [[0], [1, 2], [3]]
    assert [1, 2] in plan["merged"]


def test_recompute_false_reads_dense_similarity_at_original_indices(monkeypatch) -> None:
    hand = np.eye(4)
    hand[0, 1] = hand[1, 0] = 0.9
    hand[1, 2] = hand[2, 1] = 0.5
    hand[2, 3] = hand[3, 2] = 0.8
    hand[0, 2] = hand[2, 0] = 0.1  # after (0, 1) merge, layer "0" (group [0, 1]) meets layer 2
    for recompute, n_calls in ((False, 1), (True, 2)):
        calls: list = []
        monkeypatch.setattr(mka_module, "layer_similarity", hand_similarity(hand, calls))
        ctx = context(tiny_llama())
        details = compress(ctx, {"name": "mka", "num_remove": 2, "recompute": recompute})["details"]
        assert len(calls) == n_calls
        if not recompute:
            assert [s["pair"] for s in details["steps"]] == [[0, 1], [1, 2]]
            assert [s["alpha"] for s in details["steps"]] == [0.9, 0.8]
            assert ctx.plan.groups == [[0, 1], [2, 3]]


def test_pair_last_alpha_code_real_scores() -> None:
    model = tiny_llama(seed=1)
    before = layer_weights(model)
    ctx = context(model)
    details = compress(ctx, {"name": "mka", "num_remove": 1, "pair": "last", "alpha": "code"})["details"]
    step = details["steps"][0]
    assert step["pair"] == [2, 3] and step["original_layers"] == [[2], [3]]
    s0 = np.array(details["similarity_step0"], dtype=np.float64)
    assert s0.shape == (4, 4)
    assert step["alpha"] == pytest.approx(merge_alpha(s0, 2, 3, mode="code"), abs=1e-5)
    assert 0.55 < step["alpha"] < 0.75  # the released code's sigmoid ratio sits near sigmoid(0.5) = 0.62
    assert_merged(model, before, 2, step["alpha"])
    assert ctx.plan.groups == [[0], [1], [2, 3]] and model.config.num_hidden_layers == 3


def test_default_run_is_finite_and_recaptures() -> None:
    ctx = context(tiny_llama(seed=2))
    details = compress(ctx, {"name": "mka", "num_remove": 2})["details"]
    assert ctx.num_layers == 2
    for step in details["steps"]:
        assert 0.0 <= step["alpha"] <= 1.0 and np.isfinite(step["similarity"])
        assert step["similarity"] == max(step["adjacent_similarity"])
    assert len(details["steps"][1]["adjacent_similarity"]) == 2  # scored on the 3-layer model
    assert sorted(o for g in ctx.plan.groups for o in g) == [0, 1, 2, 3]


# Normalisation --------------------------------------------------------------------------------


def test_diagonal_normalisation_identical_layers_score_one() -> None:
    model = tiny_llama(seed=3)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: its output equals layer 1's
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ctx = context(model)
    features = capture_statistics(model, ctx.calibration, 4, None).sample_features[1:]
    assert torch.equal(features[1], features[2])

    scores = layer_similarity(features.double().numpy(), MKAConfig())
    s, raw, diag = scores["similarity"], scores["raw"], scores["self"]
    np.testing.assert_array_equal(np.diag(s), 1.0)
    assert s[1, 2] == pytest.approx(1.0, abs=1e-12)
    assert raw[1, 2] == pytest.approx(diag[1], rel=1e-12)  # raw identical-layer NPIB is the self-NPIB, not 1
    np.testing.assert_allclose(s, s.T)

    before = layer_weights(model)
    details = compress(ctx, {"name": "mka", "num_remove": 1})["details"]
    step = details["steps"][0]
    assert step["pair"] == [1, 2] and step["alpha"] == pytest.approx(1.0)


def test_self_similarity_matches_raw_npib_diagonal() -> None:
    rng = np.random.default_rng(0)
    base = rng.random((40, 2))
    embeddings = [base, base + 0.05 * rng.random((40, 2)), rng.random((40, 2))]
    raw = npib_similarity(embeddings, n_neighbors=5, k_entropy=10, guard="none")
    diag = self_similarity(embeddings, n_neighbors=5, k_entropy=10, guard="none")
    np.testing.assert_allclose(diag, np.diag(raw), rtol=1e-12)
    guarded = npib_similarity(embeddings, n_neighbors=5, k_entropy=10, guard="abs")
    s = normalise_by_diagonal(guarded, self_similarity(embeddings, n_neighbors=5, k_entropy=10, guard="abs"))
    np.testing.assert_array_equal(np.diag(s), 1.0)
    assert s[0, 1] > s[0, 2] and s[0, 1] <= 1.0 + 1e-9
    # With a positive guard the entropies cancel: S'_ij = MI_ij / sqrt(MI_ii MI_jj), whatever the guard.
    s_shift = normalise_by_diagonal(
        npib_similarity(embeddings, n_neighbors=5, k_entropy=10, guard="shift", eps=1.0),
        self_similarity(embeddings, n_neighbors=5, k_entropy=10, guard="shift", eps=1.0),
    )
    np.testing.assert_allclose(s_shift, s, rtol=1e-9)


# Configuration and output --------------------------------------------------------------------


def test_too_few_calibration_samples() -> None:
    with pytest.raises(ConfigError, match="num_blocks=4 is too few"):
        compress(context(tiny_llama(), n=4), {"name": "mka", "num_remove": 1})


@pytest.mark.parametrize(("key", "value"), [("pair", "first"), ("alpha", "half"), ("similarity_norm", "max"), ("guard", "clip")])
def test_bad_choices_rejected(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"method.{key}"):
        compress(context(tiny_llama()), {"name": "mka", "num_remove": 1, key: value})


def test_yaml_lists_every_key_with_defaults() -> None:
    conf = OmegaConf.to_container(OmegaConf.load(REPO / "conf/method/mka.yaml"))
    defaults = MKAConfig().__dict__
    assert conf == defaults


def test_save_reload_gives_identical_logits(tmp_path) -> None:
    model = tiny_llama(seed=4)
    compress(context(model), {"name": "mka", "num_remove": 2})
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    ids = blocks(2, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


# What the default score is -----------------------------------------------------------------------


def test_default_score_is_normalised_mi_whatever_the_entropy_settings() -> None:
    """With similarity_norm=diagonal the NPIB entropy terms cancel: S'_ij = MI_ij / sqrt(MI_ii MI_jj)."""
    from layerfold.scoring.manifold import layer_embeddings, mutual_information_matrix

    model = tiny_llama(seed=5)
    features = capture_statistics(model, blocks(32), 4, None).sample_features[1:].double().numpy()
    mi = mutual_information_matrix(layer_embeddings(list(features)))
    mi = 0.5 * (mi + mi.T)  # npib_similarity symmetrises S_ij, and the entropies cancel inside each term
    expected = mi / np.sqrt(np.outer(np.diag(mi), np.diag(mi)))
    np.fill_diagonal(expected, 1.0)
    for k_entropy, guard in ((16, "abs"), (5, "abs"), (16, "shift")):
        s = layer_similarity(features, MKAConfig(k_entropy=k_entropy, guard=guard))["similarity"]
        np.testing.assert_allclose(s, expected, rtol=1e-9 if guard == "abs" else 1e-6)


def test_k_entropy_above_the_samples_is_an_error_not_a_clamp() -> None:
    with pytest.raises(ConfigError, match=r"method.k_entropy=50 needs more than 50 samples per draw, but there are 32 .*allowed 1..31"):
        compress(context(tiny_llama()), {"name": "mka", "num_remove": 1, "k_entropy": 50})
    with pytest.raises(ConfigError, match=r"method.k_entropy=16 .* there are 10 \(data.calibration.num_blocks=40, method.draws=4\)"):
        compress(context(tiny_llama(), n=40), {"name": "mka", "num_remove": 1, "draws": 4})


def test_captured_float32_features_score_as_their_float64_copy() -> None:
    """The method hands the captured tensor over as it is; it used to convert it to a float64 numpy array first."""
    from layerfold.methods.mka import averaged_similarity

    features = capture_statistics(tiny_llama(seed=9), blocks(40), 4, None).sample_features[1:]
    assert features.dtype == torch.float32
    cfg = MKAConfig(draws=2, k_entropy=8)
    as_tensor, as_numpy = averaged_similarity(features, cfg), averaged_similarity(features.double().numpy(), cfg)
    assert as_tensor.keys() == as_numpy.keys()
    for key in as_tensor:
        np.testing.assert_array_equal(as_tensor[key], as_numpy[key], err_msg=key)


# Draws, near-ties, tie-break -------------------------------------------------------------------


def test_draws_average_disjoint_subsets_and_report_spread() -> None:
    from layerfold.methods.mka import averaged_similarity, draw_indices

    parts = draw_indices(40, 2, seed=3)
    assert len(parts) == 2 and len(parts[0]) == len(parts[1]) == 20 and not set(parts[0]) & set(parts[1])
    model = tiny_llama(seed=6)
    features = capture_statistics(model, blocks(40), 4, None).sample_features[1:].double().numpy()
    cfg = MKAConfig(draws=2, draw_seed=3, k_entropy=8)
    out = averaged_similarity(features, cfg)
    each = [layer_similarity(features[:, idx], cfg)["similarity"] for idx in parts]
    np.testing.assert_allclose(out["similarity"], (each[0] + each[1]) / 2)
    np.testing.assert_allclose(out["stderr"], np.abs(each[0] - each[1]) / 2, atol=1e-12)  # std (ddof 1) / sqrt(2)

    ctx = MethodContext(model, tokenizer=None, calibration=blocks(40), stats=None, batch_size=4)
    details = compress(ctx, {"name": "mka", "num_remove": 1, "draws": 2, "draw_seed": 3, "k_entropy": 8})["details"]
    step = details["steps"][0]
    assert details["settings"]["samples_per_draw"] == 20
    assert len(step["winning_pair_per_draw"]) == 2 and len(step["spearman_between_draws"]) == 1
    assert step["similarity_stderr"] > 0 and step["pair"][0] in step["near_ties"]


def test_tie_break_by_loss_merges_the_least_harmful_near_tie(monkeypatch) -> None:
    from layerfold.execution.loss import calibration_nll
    from layerfold.surgery import weighted

    matrix = np.full((4, 4), 0.5)
    np.fill_diagonal(matrix, 1.0)
    matrix[0, 1] = matrix[1, 0] = matrix[2, 3] = matrix[3, 2] = 0.9  # two exact ties, pairs (0,1) and (2,3)
    monkeypatch.setattr(mka_module, "layer_similarity", hand_similarity(matrix, []))
    losses = {}
    for t in (0, 2):
        model = tiny_llama(seed=7)
        ctx = context(model)
        ctx.merge(t, [t + 1], weighted(0.9))
        losses[t] = calibration_nll(model, ctx.calibration, 4)
    model = tiny_llama(seed=7)
    details = compress(context(model), {"name": "mka", "num_remove": 1, "tie_break": "loss"})["details"]
    step = details["steps"][0]
    assert step["near_ties"] == [0, 2]
    assert step["pair"][0] == min(losses, key=losses.get)
    assert step["tie_break_loss"] == {str(t): pytest.approx(v, abs=1e-6) for t, v in losses.items()}
    # Without the tie-break the paper's rule takes the later of the tied pairs and only reports the tie.
    plain = compress(context(tiny_llama(seed=7)), {"name": "mka", "num_remove": 1})["details"]["steps"][0]
    assert plain["pair"] == [2, 3] and plain["near_ties"] == [0, 2] and "tie_break_loss" not in plain


# Released-code parity -----------------------------------------------------------------------------


def test_released_output_without_merge_is_drop_last() -> None:
    model = tiny_llama(seed=8)
    before = layer_weights(model)
    cfg = {"name": "mka", "num_remove": 2, "pair": "last", "alpha": "code", "recompute": False,
           "similarity_norm": "none", "guard": "none", "apply_merge": False}
    details = compress(context(model), cfg)["details"]
    assert [s["applied"] for s in details["steps"]] == ["drop upper layer"] * 2
    assert [s["alpha"] for s in details["steps"]] == [None, None]
    after = layer_weights(model)
    assert len(after) == 2
    for i in range(2):
        assert all(torch.equal(after[i][k], before[i][k]) for k in before[i])


@pytest.mark.parametrize("preset", ["mka_code_parity", "mka_code_released"])
def test_parity_presets_match_the_released_schedule(preset: str) -> None:
    method = OmegaConf.load(REPO / f"conf/experiment/{preset}.yaml")["method"]
    assert (method.pair, method.alpha, method.recompute, method.similarity_norm, method.guard) == ("last", "code", False, "none", "none")
    assert method.apply_merge == (preset == "mka_code_parity")


def test_draws_preset_fits_its_own_calibration() -> None:
    preset = OmegaConf.load(REPO / "conf/experiment/mka_draws.yaml")
    per_draw = preset.data.calibration.num_blocks // preset.method.draws
    assert preset.method.tie_break == "loss" and per_draw == 32
    assert MKAConfig().k_entropy < per_draw and MKAConfig().n_neighbors < per_draw


# merge weight (the decision MKA takes from the similarity) ----------------------------------------------------------------------------

S_HAND = np.array([[1.0, 0.8, 0.2], [0.8, 1.0, 0.5], [0.2, 0.5, 1.0]])


def test_merge_alpha_paper_vs_code_by_hand() -> None:
    assert merge_alpha(S_HAND, 0, 1, mode="paper") == pytest.approx(0.8)
    # s0 = (1 + .8 + .2) / 3 = 2/3 ; s1 = (.8 + 1 + .5) / 3 = 2.3/3 ; r = 2 / 4.3
    r = 2.0 / 4.3
    assert merge_alpha(S_HAND, 0, 1, mode="code") == pytest.approx(1.0 / (1.0 + math.exp(-r)), rel=1e-12)
    assert merge_alpha(S_HAND, 0, 1, mode="code") == pytest.approx(0.614227, abs=1e-6)
    # beta scales the ratio inside the sigmoid.
    assert merge_alpha(S_HAND, 0, 1, mode="code", beta=2.0) == pytest.approx(1.0 / (1.0 + math.exp(-2 * r)))


def test_merge_alpha_paper_clamps_and_rejects_nan() -> None:
    s = np.array([[1.0, 1.7, -0.1], [1.7, 1.0, np.nan], [-0.1, np.nan, 1.0]])
    assert merge_alpha(s, 0, 1) == 1.0
    assert merge_alpha(s, 0, 2) == 0.0
    with pytest.raises(ValueError):
        merge_alpha(s, 1, 2)
    with pytest.raises(ValueError):
        merge_alpha(s, 1, 2, mode="code")
    with pytest.raises(ValueError):
        merge_alpha(S_HAND, 0, 1, mode="mean")


# pair choice -----------------------------------------------------------------------------


def test_most_similar_adjacent_pair() -> None:
    s = np.array(
        [
            [1.0, 0.3, 0.9, 0.1, 0.0],
            [0.3, 1.0, 0.6, 0.2, 0.1],
            [0.9, 0.6, 1.0, 0.4, 0.2],
            [0.1, 0.2, 0.4, 1.0, 0.6],
            [0.0, 0.1, 0.2, 0.6, 1.0],
        ]
    )
    # Adjacent scores 0.3, 0.6, 0.4, 0.6: tie between (1, 2) and (3, 4) goes to the later pair.
    assert most_similar_adjacent_pair(s) == (3, 4)
    # After layer 1 is merged away, 0 and 2 are adjacent (S = 0.9).
    assert most_similar_adjacent_pair(s, active=[0, 2, 3, 4]) == (0, 2)
    # Among [1, 2, 3] the adjacent scores are 0.6 and 0.4.
    assert most_similar_adjacent_pair(s, active=[1, 2, 3]) == (1, 2)
    # NaN never wins.
    s_nan = s.copy()
    s_nan[3, 4] = s_nan[4, 3] = np.nan
    assert most_similar_adjacent_pair(s_nan) == (1, 2)
    with pytest.raises(ValueError):
        most_similar_adjacent_pair(s, active=[2])
