"""CoMe / CoMe-P: streaming scores, budget arithmetic, the progressive loop and its bad inputs (tiny models, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import REPO, TINY_CONFIGS, tiny_model
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from layerfold.capture import LayerBoundaries
from layerfold.capture.channels import capture_channel_statistics
from layerfold.config import ConfigError, compose
from layerfold.execution.loss import calibration_nll
from layerfold.methods import MethodContext, compress, get_method
from layerfold.execution import trials as trials_module
from layerfold.methods import come as come_module
from layerfold.models import load_checkpoint, save_checkpoint
from layerfold.models.adapters import UnsupportedArchitectureError
from layerfold.scoring.channels import (
    block_ratio,
    distribute,
    ffn_sensitivity,
    head_group_sensitivity,
    ratio_grid,
    top_indices,
    window_min_max,
)
from layerfold.surgery.concat import concat_layout


def blocks(n: int = 4, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def deep_llama(layers: int, seed: int = 0, heads: int = 4, kv_heads: int = 2) -> torch.nn.Module:
    """Tiny GQA Llama (by default 4 query / 2 key-value heads) with ``layers`` layers."""
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = layers
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, kv_heads, config.hidden_size // heads
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def context(model, n_blocks: int = 4) -> MethodContext:
    return MethodContext(model, None, blocks(n_blocks), batch_size=2)


# Streaming capture -----------------------------------------------------------------------------


@pytest.mark.parametrize("skip_tokens", ["last", "all"])
def test_channel_capture_matches_brute_force(skip_tokens: str) -> None:
    """Per-channel sums and layer scores streamed over two batches equal the same quantities computed
    from every activation of all sequences at once."""
    model = tiny_model("llama")
    ids = blocks()
    stats = capture_channel_statistics(model, ids, batch_size=2, window=2, skip_tokens=skip_tokens, desc=None)

    down_inputs, o_inputs = {}, {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: down_inputs.__setitem__(i, a[0].detach())))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: o_inputs.__setitem__(i, a[0].detach())))
    with torch.no_grad(), LayerBoundaries(model) as hooks:
        model(input_ids=ids, use_cache=False)
        h = hooks.states  # pre-norm boundaries 0..L
    for handle in handles:
        handle.remove()

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(0, 1)

    for i in range(4):
        torch.testing.assert_close(stats.ffn_abs_sum[i].float(), down_inputs[i].abs().sum((0, 1)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.attn_abs_sum[i].float(), o_inputs[i].abs().sum((0, 1)), rtol=1e-5, atol=1e-5)
    bi = torch.stack([(1 - cos(h[i], h[i + 1])).mean() for i in range(4)])
    torch.testing.assert_close(stats.block_influence.float(), bi, rtol=1e-5, atol=1e-6)
    pick = (lambda t: t[:, -1]) if skip_tokens == "last" else (lambda t: t)
    skip = torch.stack([(torch.arccos(cos(pick(h[i]), pick(h[i + 2]))) / torch.pi).mean() for i in range(3)])
    torch.testing.assert_close(stats.skip_score.float(), skip, rtol=1e-4, atol=1e-5)
    assert stats.tokens == ids.numel() and stats.sequences == ids.shape[0]


# Scores and budgets ----------------------------------------------------------------------------


def test_sensitivities_use_column_l1_norms_and_kv_groups() -> None:
    # 4 query heads of head_dim 2 over 2 key-value heads: channels 0-3 are group 0, 4-7 group 1.
    abs_sum = torch.tensor([2.0, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 4.0], dtype=torch.float64)
    o_weight = torch.ones(3, 8)
    o_weight[:, 0] = -2.0  # column L1 norm 6 instead of 3
    scores = head_group_sensitivity(abs_sum, tokens=2, o_weight=o_weight, num_kv_heads=2)
    # group 0: mean(1*6, 1*3, 1*3, 1*3) = 3.75; group 1: 2 * 3 = 6
    torch.testing.assert_close(scores, torch.tensor([3.75, 6.0]))
    down = torch.tensor([[1.0, -3.0], [1.0, 0.0]])  # columns: L1 2 and 3
    torch.testing.assert_close(ffn_sensitivity(torch.tensor([4.0, 4.0]), 2, down), torch.tensor([4.0, 6.0]))


def test_block_ratio_and_distribution_follow_the_released_code() -> None:
    assert block_ratio([1.0, 3.0]) == pytest.approx([0.25, 0.75])
    assert block_ratio([1.0, 3.0], psu=2) == pytest.approx([0.1, 0.9])
    assert block_ratio([1.0, 1.0], min_max=0.8) == pytest.approx([0.8, 0.2])
    assert block_ratio([0.0, 0.0]) == [0.5, 0.5]
    assert window_min_max(0.81, 3) == pytest.approx(0.9)
    assert window_min_max(0.0, 2) == 0.0
    assert distribute(10, [0.25, 0.75]) == [2, 8]  # floor for the smaller share, the rest to the largest
    assert distribute(3, [0.5, 0.5]) == [2, 1]  # a tie goes to the first
    assert distribute(1536, [0.0, 1.0]) == [0, 1536]
    assert top_indices(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2) == [1, 3]
    assert ratio_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(ratio_grid(20)) == 21


# The progressive loop ------------------------------------------------------------------------------


def test_progressive_loop_rescores_the_current_model_and_records_the_plan(monkeypatch) -> None:
    seen = []
    import layerfold.execution.trials as trials_module  # the resident stack runs CoMe's scoring pass

    real = trials_module.capture_channel_statistics

    def spy(model, *args, **kwargs):
        seen.append(model.config.num_hidden_layers)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trials_module, "capture_channel_statistics", spy)
    model = deep_llama(6)
    ctx = context(model)
    plan = compress(ctx, {"name": "come", "num_remove": 3})

    assert seen == [6, 5, 4]  # one scoring pass per merge, each on the model as it is then
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    groups = [entry["stands_for"] for entry in plan["layers"]]
    assert sorted(o for g in groups for o in g) == list(range(6))  # every original layer is behind one new layer
    assert plan["details"]["merge_info"] == groups
    # wo_repeat (default): no merged layer is merged again, so every group is two adjacent original layers.
    assert sorted(len(g) for g in groups) == [2, 2, 2]
    assert all(g == list(range(g[0], g[0] + len(g))) for g in groups)
    for step in plan["details"]["steps"]:
        assert sum(step["ratio"]) == pytest.approx(1.0)
        assert sum(step["channels_kept"]) == 64 and sum(len(k) for k in step["kv_heads_kept"]) == 2
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=blocks()).logits).all()


def test_without_wo_repeat_a_merged_layer_can_be_merged_again() -> None:
    model = deep_llama(4)
    ctx = context(model)
    compress(ctx, {"name": "come", "target_layers": 1, "num_remove": None, "wo_repeat": False})
    assert ctx.plan.groups == [[0, 1, 2, 3]]


def test_wo_repeat_keeps_the_target_reachable() -> None:
    """Greedy windows could strand single layers between merged ones; windows that would are excluded."""
    groups = [[0], [1, 2], [3]]
    assert come_module.fresh_runs(groups) == [1, 1]
    assert not come_module.can_finish([1, 1], [2])
    assert come_module.can_finish([4], [2, 2])
    for family in ("llama", "opt", "qwen2"):
        model = tiny_model(family)
        ctx = context(model)
        compress(ctx, {"name": "come", "target_layers": 2, "num_remove": None})
        assert ctx.plan.groups == [[0, 1], [2, 3]], family


def test_saved_result_loads_in_plain_transformers(tmp_path) -> None:
    model = deep_llama(5)
    ctx = context(model)
    compress(ctx, {"name": "come", "num_remove": 2})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    reloaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert reloaded.config.num_hidden_layers == 3
    ids = blocks(2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("kv_heads", "differ"), [(4, True), (8, False)])
def test_tiled_parity_mode_changes_query_heads_only_under_gqa(kv_heads: int, differ: bool) -> None:
    steps = {}
    for heads in ("grouped", "tiled"):
        model = deep_llama(4, heads=8, kv_heads=kv_heads)  # n_rep = 2 (GQA) or 1 (multi-head)
        plan = compress(context(model), {"name": "come", "num_remove": 1, "heads": heads})
        steps[heads] = plan["details"]["steps"][0]
    grouped, tiled = steps["grouped"], steps["tiled"]
    assert grouped["positions"] == tiled["positions"] and grouped["kv_heads_kept"] == tiled["kv_heads_kept"]
    assert all(grouped["kv_heads_kept"])  # both layers keep some, but not all, of their heads
    assert (grouped["query_heads_kept"] != tiled["query_heads_kept"]) == differ


def test_plan_drives_hierarchical_distillation_spans() -> None:
    """plan.json maps every merged layer to its run of original layers: fed the dense input of that run,
    an untouched layer reproduces the dense output exactly, a merged layer does not (what distillation fits)."""
    from layerfold.recovery.local import local_span_losses
    from layerfold.recovery.spans import plan_spans

    teacher, student = deep_llama(6), deep_llama(6)
    plan = compress(context(student), {"name": "come", "num_remove": 2})
    spans = plan_spans(plan, student_layers=4, teacher_layers=6)
    merged = {entry["index"] for entry in plan["layers"] if len(entry["stands_for"]) > 1}
    assert {s.layer for s in spans if s.is_new} == merged and len(merged) == 2
    with torch.no_grad():
        losses = local_span_losses(teacher, student, spans, blocks(2), "mse")
    for span, loss in zip(spans, losses):
        assert (float(loss) > 1e-8) == (span.layer in merged), (span, float(loss))


# CoMe-P --------------------------------------------------------------------------------------------


def test_posterior_ratio_trials_run_in_place(monkeypatch) -> None:
    model = deep_llama(4)
    ctx = context(model)
    spec, cfg = get_method({"name": "come_p", "num_remove": 1, "granularity": 4})
    layout = concat_layout(model)
    stats = capture_channel_statistics(model, ctx.calibration, 2, window=2, skip_tokens="all", desc=None)
    heads, channels = come_module.layer_scores(stats, ctx, layout)
    layer_objects = list(model.model.layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def no_deepcopy(*args, **kwargs):
        raise AssertionError("a CoMe-P trial deep-copied something")

    monkeypatch.setattr(copy, "deepcopy", no_deepcopy)
    ratio, trials = come_module.posterior_ratio(ctx, cfg, layout, [1, 2], heads[1:3], channels[1:3])
    monkeypatch.undo()

    assert [t["ratio"] for t in trials] == [0.0, 0.25, 0.5, 0.75, 1.0]
    best = min(trials, key=lambda t: t["loss"])
    assert ratio == pytest.approx([best["ratio"], 1 - best["ratio"]])
    # Every trial was undone: same layer objects, same weights, same plan.
    assert list(model.model.layers) == layer_objects and model.config.num_hidden_layers == 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert ctx.plan.groups == [[0], [1], [2], [3]]
    # The trial loss is the loss of the merged model.
    choice = come_module.choose_pieces(layout, ratio, heads[1:3], channels[1:3])
    ctx.replace_merge(1, [2], come_module.concat_merge_state(model, layout, [1, 2], choice, "mean"))
    assert calibration_nll(model, ctx.calibration, 2) == pytest.approx(best["loss"], abs=1e-6)


def test_come_p_end_to_end_uses_all_tokens() -> None:
    model = deep_llama(4)
    ctx = context(model)
    plan = compress(ctx, {"name": "come_p", "num_remove": 1, "granularity": 2})
    assert plan["method"]["skip_tokens"] == "all" and plan["method"]["ratio"] == "posterior"
    step = plan["details"]["steps"][0]
    assert len(step["trials"]) == 3 and model.config.num_hidden_layers == 3


# Parity options: top boundary, skip-score window, wo_repeat rule ------------------------------------


def test_final_norm_top_boundary_changes_only_the_scores_that_read_it() -> None:
    """top_boundary=final_norm reads the final-norm output as the state leaving the last layer (HF's
    hidden_states[-1]): the last layer's BI and the last window's skip score change, nothing else does."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, model.config.hidden_size))  # not a constant
    ids = blocks()
    pre = capture_channel_statistics(model, ids, batch_size=2, window=2, skip_tokens="last", desc=None)
    post = capture_channel_statistics(model, ids, batch_size=2, window=2, skip_tokens="last", desc=None, top_boundary="final_norm")
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # the last entry is the final-norm output

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).clamp(0, 1)

    torch.testing.assert_close(post.block_influence[-1].float(), (1 - cos(hidden[-2], hidden[-1])).mean(), rtol=1e-5, atol=1e-6)
    skip_last = (torch.arccos(cos(hidden[-3][:, -1], hidden[-1][:, -1])) / torch.pi).mean()
    torch.testing.assert_close(post.skip_score[-1].float(), skip_last, rtol=1e-4, atol=1e-5)
    assert abs(float(post.block_influence[-1] - pre.block_influence[-1])) > 1e-4
    torch.testing.assert_close(post.block_influence[:-1], pre.block_influence[:-1], rtol=0, atol=0)
    torch.testing.assert_close(post.skip_score[:-1], pre.skip_score[:-1], rtol=0, atol=0)
    for a, b in zip(post.ffn_abs_sum + post.attn_abs_sum, pre.ffn_abs_sum + pre.attn_abs_sum):
        assert torch.equal(a, b)


def test_released_skip_window_spans_two_layers_for_any_window_size(monkeypatch) -> None:
    windows = []
    real = trials_module.capture_channel_statistics

    def spy(model, *args, **kwargs):
        windows.append(kwargs["window"])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trials_module, "capture_channel_statistics", spy)
    for skip_layers, expected in ((None, [3, 3]), (2, [2, 2])):
        windows.clear()
        plan = compress(context(deep_llama(6)), {"name": "come", "num_remove": 4, "merge_layers": 3, "skip_layers": skip_layers,
                                                 "wo_repeat": False})
        assert windows == expected
        first = plan["details"]["steps"][0]
        # released: the first L - merge_item + 1 windows are candidates (4 of the 5 two-layer windows at 6 layers)
        assert len(first["skip_score"]) == 4
        assert len(first["positions"]) == 3


def test_released_wo_repeat_rule_closes_windows_near_merged_layers() -> None:
    groups = [[0], [1, 2], [3], [4], [5, 6], [7]]
    assert come_module.released_exclusions(groups, 2, 5) == [0, 1, 3, 4]
    assert come_module.released_exclusions(groups, 3, 4) == [0, 1, 2, 3]  # starts idx - 2 .. idx + 1 of each merged layer
    assert come_module.released_exclusions([[0], [1], [2, 3]], 2, 2) == [1]  # start 2 does not exist (the code: IndexError)


def test_released_wo_repeat_rule_merges_window_0_once_every_window_is_closed(caplog) -> None:
    """4 -> 1 layers: the reachable rule refuses the target; the released rule runs on and, once every window touches a
    merged layer, merges window 0 as the code's index(min) of all-inf scores does, with a warning."""
    with pytest.raises(ConfigError, match="cannot reach 1 layers from 4"):
        compress(context(deep_llama(4)), {"name": "come", "target_layers": 1, "num_remove": None})
    ctx = context(deep_llama(4))
    with caplog.at_level("WARNING", logger="layerfold.methods.come"):
        plan = compress(ctx, {"name": "come", "target_layers": 1, "num_remove": None, "wo_repeat_rule": "released"})
    assert ctx.plan.groups == [[0, 1, 2, 3]]
    assert any("closes every window" in r.message for r in caplog.records)
    assert plan["details"]["steps"][-1]["positions"] == [0, 1]


def test_wo_repeat_warns_where_it_fixes_the_windows(monkeypatch, caplog) -> None:
    """At half the depth wo_repeat fixes the pairs before any score (warned up front); when the lowest-scoring
    window would strand the target, the rule's choice is logged and recorded in the step."""
    assert come_module.windows_fixed(32, 16, 2) and come_module.windows_fixed(30, 15, 2)
    assert not come_module.windows_fixed(30, 16, 2) and not come_module.windows_fixed(32, 17, 2)
    assert come_module.fixed_windows(6, 3, 2) == [[0, 1], [2, 3], [4, 5]]
    real = trials_module.capture_channel_statistics

    def lowest_at_one(model, *args, **kwargs):  # window 1 (layers 1, 2) scores lowest at every step
        stats = real(model, *args, **kwargs)
        stats.skip_sum = torch.full_like(stats.skip_sum, 5.0)
        stats.skip_sum[1] = 0.0
        return stats

    monkeypatch.setattr(trials_module, "capture_channel_statistics", lowest_at_one)
    ctx = context(deep_llama(6))
    with caplog.at_level("WARNING", logger="layerfold.methods.come"):
        plan = compress(ctx, {"name": "come", "target_layers": 3, "num_remove": None})
    messages = [r.message for r in caplog.records]
    assert any("wo_repeat alone fixes the windows" in m for m in messages)
    assert sorted(ctx.plan.groups) == [[0, 1], [2, 3], [4, 5]]
    first = plan["details"]["steps"][0]
    assert first["wo_repeat_decided"] == {"lowest_score": 1, "chosen": 0}
    assert any("not the scores, chose window 0" in m for m in messages)
    # The released rule follows the scores there: (1, 2) first.
    plan = compress(context(deep_llama(6)), {"name": "come", "target_layers": 4, "num_remove": None, "wo_repeat_rule": "released"})
    assert plan["details"]["steps"][0]["positions"] == [1, 2] and "wo_repeat_decided" not in plan["details"]["steps"][0]


# Bad input: errors before any scoring ---------------------------------------------------------------


@pytest.fixture
def no_scoring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("scoring ran before the configuration was checked")

    import layerfold.execution.trials as trials_module  # the resident stack runs CoMe's scoring pass

    monkeypatch.setattr(trials_module, "capture_channel_statistics", fail)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_remove": 3}, "wo_repeat=true cannot reach 1 layers from 4"),
        ({"target_layers": 4, "num_remove": None}, "target_layers"),
        ({"target_layers": 2}, "exactly one of num_remove"),
        ({"num_remove": 1, "ratio": "posterior", "merge_layers": 3}, "merge_layers=2"),
        ({"num_remove": 1, "heads": "interleaved"}, "heads"),
    ],
)
def test_bad_settings_fail_before_scoring(no_scoring, settings: dict, message: str) -> None:
    ctx = context(tiny_model("llama"))
    with pytest.raises(ConfigError, match=message):
        compress(ctx, {"name": "come", **settings})
    assert ctx.num_layers == 4


def test_unsupported_architectures_fail_before_scoring(no_scoring) -> None:
    with pytest.raises(UnsupportedArchitectureError, match="separate query/key/value"):
        compress(context(tiny_model("gpt_neox")), {"name": "come", "num_remove": 1})
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = torch.nn.Identity()
    with pytest.raises(UnsupportedArchitectureError, match="MLP intermediate"):
        compress(context(model), {"name": "come", "num_remove": 1})


# Configuration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["method=come"], {"name": "come", "ratio": "bi", "skip_tokens": "last", "heads": "grouped"}),
        (["method=come_p"], {"name": "come_p", "ratio": "posterior", "skip_tokens": "all", "granularity": 20}),
        (["+experiment=come_code_parity"], {"name": "come", "heads": "tiled", "top_boundary": "final_norm", "skip_layers": 2,
                                             "wo_repeat_rule": "released"}),
        (["+experiment=come_p_code_parity"], {"name": "come_p", "heads": "tiled", "top_boundary": "final_norm", "skip_layers": 2,
                                               "wo_repeat_rule": "released", "ratio": "posterior"}),
        (["method=come"], {"top_boundary": "pre_norm", "skip_layers": None, "wo_repeat_rule": "reachable"}),
        (["+experiment=come_distill"], {"name": "come", "heads": "grouped"}),
    ],
)
def test_configs_compose_and_validate(overrides: list[str], expected: dict) -> None:
    composed = compose(REPO / "conf", overrides)
    _, cfg = get_method(composed["method"], {"num_layers": 30})
    for key, value in expected.items():
        assert cfg[key] == value, key
    if "come_distill" in overrides[0]:
        assert composed["recovery"]["name"] == "come"  # hierarchical distillation after the merge
