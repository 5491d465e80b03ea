"""LaCo, Gromov et al. and SLEB on tiny random Llamas (CPU, seconds)."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from conftest import load_benchmark
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from layerfold.capture import BoundaryStatistics
from layerfold.config import ConfigError
from layerfold.execution.loss import calibration_nll
from layerfold.methods import MethodContext, compress, get_method
from layerfold.methods.laco import LACO_SENTENCES
from layerfold.methods.sleb import SLEBConfig
from layerfold.scoring.similarity import block_angular_distance
from layerfold.surgery import rdsc_code, rdsc_paper

VOCAB = 96
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer, trained offline on the LaCo sentences (BPE, BOS ``<s>``)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(LACO_SENTENCES * 3, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert len(wrapped) <= VOCAB
    return wrapped


def tiny_llama(layers: int, seed: int = 0, hidden: int = 8, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, initializer_range=init,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def context(model, tokenizer, blocks: torch.Tensor | None = None, stats=None) -> MethodContext:
    if blocks is None:
        blocks = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    return MethodContext(model, tokenizer, blocks, stats=stats, batch_size=2)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# RDSC merge ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rdsc", "expected"), [("paper", 1 + (2 - 1) + (4 - 1)), ("code", 4)])
def test_rdsc_merge_of_constant_layers(tokenizer, rdsc: str, expected: float) -> None:
    model = tiny_llama(5)
    layers = model.model.layers
    with torch.no_grad():
        for i, value in enumerate((1.0, 2.0, 4.0)):
            for name in LINEARS:
                layers[i].get_submodule(name).weight.fill_(value)
            for j, name in enumerate(NORMS):
                layers[i].get_submodule(name).weight.fill_(10.0 * (i + 1) + j)
    norms0 = {name: layers[0].get_submodule(name).weight.detach().clone() for name in NORMS}
    ctx = context(model, tokenizer)
    combine = {"paper": rdsc_paper, "code": rdsc_code}[rdsc]
    ctx.merge(0, [1, 2], combine)

    merged = model.model.layers[0]
    for name in LINEARS:
        assert torch.equal(merged.get_submodule(name).weight, torch.full_like(merged.get_submodule(name).weight, expected)), name
    for name in NORMS:
        assert torch.equal(merged.get_submodule(name).weight, norms0[name]), name
    assert ctx.plan.groups == [[0, 1, 2], [3], [4]]
    assert ctx.num_layers == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


# LaCo ------------------------------------------------------------------------------------------


def test_laco_accept_everything_lands_on_target(tokenizer) -> None:
    model = tiny_llama(6)
    ctx = context(model, tokenizer)
    details = compress(ctx, {"name": "laco", "threshold": -1.0, "target_layers": 4})["details"]
    assert ctx.num_layers == 4 and model.config.num_hidden_layers == 4
    assert details["final_layers"] == 4 and details["target_reached"] is True
    covered = sorted(o for g in ctx.plan.groups for o in g)
    assert covered == list(range(6))  # every original layer exactly once
    # H = 5, C = 4: first base l = 1, K = min(3, 6 - 1 - 1) clamped to 6 - 4 = 2 -> layers 1..3 fold into 1.
    assert details["trials"] == [
        {"base": 1, "folded": 2, "original_layers": [1, 2, 3], "similarity": details["trials"][0]["similarity"], "accepted": True}
    ]
    assert ctx.plan.groups == [[0], [1, 2, 3], [4], [5]]
    out = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert out.shape == (1, 4, VOCAB) and torch.isfinite(out).all()


def test_laco_follows_notebook_control_flow_without_target(tokenizer) -> None:
    model = tiny_llama(10)
    ctx = context(model, tokenizer)
    details = compress(ctx, {"name": "laco", "threshold": -1.0, "merge_layers": 3, "interval": 1})["details"]
    # l = 9 - 3 = 6: fold 7,8 -> 8 layers, l = 5: fold 6,7 -> 6 layers, l = 4: fold 5 (K = min(2, 6-4-1))
    # -> 5 layers, l = 3: fold 4 -> 4, l = 2: fold 3 -> 3, l = 1: fold 2 -> 2, l = 0: fold 1 -> 1.
    assert [(t["base"], t["folded"]) for t in details["trials"]] == [(6, 2), (5, 2), (4, 1), (3, 1), (2, 1), (1, 1), (0, 1)]
    assert details["target_reached"] is None and ctx.num_layers == 1


def test_laco_reject_everything_leaves_model_untouched(tokenizer, caplog) -> None:
    model = tiny_llama(6)
    before = state(model)
    layer_ids = [id(layer) for layer in model.model.layers]
    ctx = context(model, tokenizer)
    details = compress(ctx, {"name": "laco", "threshold": 1.0, "target_layers": 4, "rdsc": "code"})["details"]
    # l = 1 rejected -> l = 0 rejected -> loop ends.
    assert [t["base"] for t in details["trials"]] == [1, 0]
    assert not any(t["accepted"] for t in details["trials"])
    assert all(t["similarity"] <= 1.0 for t in details["trials"])
    assert details["target_reached"] is False and "above target_layers=4" in details["note"]
    assert "above target_layers" in caplog.text
    assert model.config.num_hidden_layers == 6 and ctx.num_layers == 6
    assert [id(layer) for layer in model.model.layers] == layer_ids
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert ctx.plan.groups == [[i] for i in range(6)]


def test_laco_never_deep_copies(tokenizer, monkeypatch) -> None:
    model = tiny_llama(6)
    ctx = context(model, tokenizer)
    spec, cfg = get_method({"name": "laco", "threshold": 0.5, "target_layers": 3, "interval": 1})
    original = copy.deepcopy
    calls = []

    def guarded(obj, *args, **kwargs):
        # OmegaConf deep-copies config values (strings) on access; anything holding weights is forbidden.
        if isinstance(obj, (torch.nn.Module, torch.Tensor)):
            raise AssertionError(f"copy.deepcopy({type(obj).__name__}) called during LaCo")
        calls.append(type(obj).__name__)
        return original(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", guarded)
    details = spec.fn(ctx, cfg)
    assert details["trials"] and any(t["accepted"] for t in details["trials"])
    assert ctx.num_layers == 3
    assert not {"LlamaForCausalLM", "LlamaDecoderLayer", "ModuleList", "Parameter"} & set(calls)


def test_laco_tokenizes_with_bos(tokenizer) -> None:
    from layerfold.methods.laco import tokenize_sentences

    with_bos = tokenize_sentences(tokenizer, ["Torreorgaz is a municipality in the"], add_bos=True)[0]
    without = tokenize_sentences(tokenizer, ["Torreorgaz is a municipality in the"], add_bos=False)[0]
    assert with_bos[0].item() == tokenizer.bos_token_id and torch.equal(with_bos[1:], without)


# Gromov ----------------------------------------------------------------------------------------


def test_block_angular_distance_on_hand_made_matrix() -> None:
    # 4 layers -> 5 boundaries; entry [i, j] = |i - j| / 10 except a short cut between boundaries 1 and 3.
    idx = torch.arange(5, dtype=torch.float32)
    angular = (idx[:, None] - idx[None, :]).abs() / 10
    angular[1, 3] = angular[3, 1] = 0.01
    assert torch.allclose(block_angular_distance(angular, 2), torch.tensor([0.2, 0.01, 0.2]))
    assert torch.allclose(block_angular_distance(angular, 1), torch.full((4,), 0.1))
    with pytest.raises(ValueError):
        block_angular_distance(angular, 5)


def _stats_with_angular(angular: torch.Tensor) -> BoundaryStatistics:
    stats = BoundaryStatistics(num_boundaries=angular.shape[0])
    stats.last_angular_sum = 3 * angular.double()  # three sequences' worth
    stats.sequences = 3
    return stats


def test_gromov_removes_block_with_smallest_distance(tokenizer) -> None:
    model = tiny_llama(6)
    idx = torch.arange(7, dtype=torch.float32)
    angular = (idx[:, None] - idx[None, :]).abs() / 10
    angular[2, 4] = angular[4, 2] = 0.05  # block of layers 2, 3
    ctx = context(model, tokenizer, stats=_stats_with_angular(angular))
    details = compress(ctx, {"name": "gromov", "num_remove": 2})["details"]
    assert details["chosen_start"] == 2 and details["removed_layers"] == [2, 3]
    assert details["block_angular_distance"] == pytest.approx([0.2, 0.2, 0.05, 0.2, 0.2])
    assert ctx.plan.groups == [[0], [1], [4], [5]] and model.config.num_hidden_layers == 4


def test_gromov_ties_go_to_the_later_block(tokenizer) -> None:
    model = tiny_llama(6)
    angular = torch.ones(7, 7)
    angular.fill_diagonal_(0.0)
    ctx = context(model, tokenizer, stats=_stats_with_angular(angular))
    details = compress(ctx, {"name": "gromov", "num_remove": 3})["details"]
    assert details["removed_layers"] == [3, 4, 5]


def test_gromov_end_to_end_with_captured_stats(tokenizer) -> None:
    model = tiny_llama(5)
    ctx = context(model, tokenizer)  # stats=None -> captured from the model
    details = compress(ctx, {"name": "gromov", "num_remove": 2})["details"]
    assert len(details["block_angular_distance"]) == 4 and ctx.num_layers == 3


# SLEB ------------------------------------------------------------------------------------------


def _identity_layer(model, i: int) -> None:
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


def _greedy_blocks(model, n: int = 4, length: int = 16) -> torch.Tensor:
    """Calibration the model itself predicts well, so removing any working layer raises the loss."""
    prompts = torch.randint(3, VOCAB, (n, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=length - 2, min_new_tokens=length - 2, do_sample=False, pad_token_id=2)


def test_sleb_removes_the_exact_identity_layer(tokenizer) -> None:
    model = tiny_llama(5, seed=3, hidden=16, init=0.3)
    _identity_layer(model, 2)
    blocks = _greedy_blocks(model)
    dense = calibration_nll(model, blocks, 2)
    ctx = context(model, tokenizer, blocks)
    details = compress(ctx, {"name": "sleb", "num_remove": 1})["details"]
    assert details["removed_layers"] == [2]
    step = details["steps"][0]
    assert [c["position"] for c in step["candidates"]] == [1, 2, 3]  # first and last protected
    assert step["loss"] == pytest.approx(dense, abs=1e-5) == details["dense_loss"]
    assert ctx.plan.groups == [[0], [1], [3], [4]]


def test_sleb_never_removes_protected_layers(tokenizer) -> None:
    model = tiny_llama(5, seed=3, hidden=16, init=0.3)
    _identity_layer(model, 0)
    blocks = _greedy_blocks(model)
    ctx = context(model, tokenizer, blocks)
    details = compress(ctx, {"name": "sleb", "num_remove": 2})["details"]
    assert 0 not in details["removed_layers"] and 4 not in details["removed_layers"]
    for step in details["steps"]:
        assert all(0 not in c["original_layers"] and 4 not in c["original_layers"] for c in step["candidates"])
    # Positive control: without the early barrier the identity layer 0 goes first.
    model = tiny_llama(5, seed=3, hidden=16, init=0.3)
    _identity_layer(model, 0)
    ctx = context(model, tokenizer, blocks)
    details = compress(ctx, {"name": "sleb", "num_remove": 1, "protect_first": 0})["details"]
    assert details["removed_layers"] == [0]


def test_sleb_protection_follows_original_indices(tokenizer) -> None:
    model = tiny_llama(6)
    ctx = context(model, tokenizer)
    ctx.remove([1])  # original 5 is now at position 4
    details = compress(ctx, {"name": "sleb", "num_remove": 2, "protect_first": 2})["details"]
    allowed = {2, 3, 4}
    assert set(details["removed_layers"]) <= allowed and len(details["removed_layers"]) == 2
    assert details["protected_layers"] == [0, 1, 5]


# Config ----------------------------------------------------------------------------------------


def test_misspelt_key_names_the_key() -> None:
    with pytest.raises(ConfigError, match="treshold"):
        get_method({"name": "laco", "treshold": 0.5})
    with pytest.raises(ConfigError, match="num_remov"):
        get_method({"name": "sleb", "num_remov": 2})


def test_yaml_entries_validate() -> None:
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "method"
    for name in ("laco", "gromov", "sleb"):
        raw = OmegaConf.load(conf / f"{name}.yaml")
        spec, cfg = get_method(raw)
        assert spec.name == name
        assert set(raw.keys()) == set(cfg.keys())  # every key listed explicitly
    assert list(OmegaConf.load(conf / "laco.yaml").sentences) == LACO_SENTENCES


def test_laco_bad_settings_raise(tokenizer) -> None:
    ctx = context(tiny_llama(6), tokenizer)
    with pytest.raises(ConfigError, match="rdsc"):
        compress(ctx, {"name": "laco", "rdsc": "mean"})
    with pytest.raises(ConfigError, match="target_layers"):
        compress(ctx, {"name": "laco", "target_layers": 6})


# SLEB search: the loss without each layer, sharing the prefix ------------------------------------
#
# The references are the search this replaced: every candidate removed on trial and the whole model run
# over the calibration blocks (``calibration_nll``); the whole search is benchmarks/sleb_search.py's
# ``search_before``, which times it against the new one.


def reference_removal_nll(model, blocks: torch.Tensor, positions, batch_size: int) -> dict[int, float]:
    from layerfold.surgery import StackSnapshot, remove_layers

    losses = {}
    for i in positions:
        snapshot = StackSnapshot(model)
        remove_layers(model, [i])
        losses[i] = calibration_nll(model, blocks, batch_size)
        snapshot.restore()
    return losses


@pytest.mark.usefixtures("one_thread")
def test_removal_nll_equals_trial_removal_bit_for_bit(family) -> None:
    from conftest import tiny_model

    from layerfold.execution.loss import removal_nll
    from layerfold.models.adapters import get_adapter

    model = tiny_model(family, seed=1)
    adapter = get_adapter(model)
    blocks = torch.randint(0, model.config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(2))
    before = state(model)
    layer_ids = [id(layer) for layer in adapter.get_layers(model)]
    positions = list(range(adapter.num_layers(model)))  # the first and the last layer included
    assert removal_nll(model, blocks, positions, batch_size=2) == reference_removal_nll(model, blocks, positions, 2)
    # A gap in the candidates: the state is carried through the layers between them.
    assert removal_nll(model, blocks, [0, 2], batch_size=3) == reference_removal_nll(model, blocks, [0, 2], 3)
    assert [id(layer) for layer in adapter.get_layers(model)] == layer_ids
    assert model.config.num_hidden_layers == len(layer_ids)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match=r"positions \[4\] out of range for a model with 4 layers \(valid: 0..3\)"):
        removal_nll(model, blocks, [4])


@pytest.mark.usefixtures("one_thread")
def test_removal_nll_runs_each_shared_prefix_once(tokenizer) -> None:
    from layerfold.execution.loss import removal_nll

    model = tiny_llama(8)
    blocks = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    calls = [0]
    for layer in model.model.layers:
        layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    removal_nll(model, blocks, range(1, 7), batch_size=4)  # one batch
    # prefix to layer 1 (1 pass) + carried through layers 1..5 (5) + tails 6+5+4+3+2+1 (21); a full
    # forward per candidate, as before, would be 6 x 7 = 42 layer passes.
    assert calls[0] == 1 + 5 + 21
    calls[0] = 0
    reference_removal_nll(model, blocks, range(1, 7), 4)
    assert calls[0] == 42


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("which", ["tiny_llama", "stories260k"])
def test_sleb_chooses_the_blocks_of_the_trial_removal_search(tokenizer, which: str) -> None:
    if which == "tiny_llama":
        def make():
            return tiny_llama(6, seed=5, hidden=16, init=0.3)
        blocks_of = _greedy_blocks
        num_remove = 2
    else:
        from conftest import models_dir

        from layerfold.models.llama2c import load_llama2c, load_llama2c_model

        root = models_dir() / "stories260K"
        if not (root / "stories260K.bin").is_file():
            pytest.skip("stories260K not present (set LAYERFOLD_MODELS_DIR)")

        def make():
            return load_llama2c_model(root / "stories260K.bin")

        _, stories_tokenizer = load_llama2c(root / "stories260K.bin", root / "tok512.bin")
        text = " ".join(LACO_SENTENCES)
        ids = torch.tensor(stories_tokenizer(text)["input_ids"])
        blocks_of = lambda model: ids[: (ids.numel() // 24) * 24].view(-1, 24)[:4]  # noqa: E731
        num_remove = 2
    model = make()
    blocks = blocks_of(model)
    reference = context(make(), tokenizer, blocks)
    before = load_benchmark("sleb_search").search_before(reference, SLEBConfig(num_remove=num_remove))  # protects first and last
    order, per_step = before["removal_order"], [step["losses"] for step in before["steps"]]
    ctx = context(model, tokenizer, blocks)
    details = compress(ctx, {"name": "sleb", "num_remove": num_remove})["details"]
    assert details["removal_order"] == order
    for step, losses in zip(details["steps"], per_step):
        assert {c["position"]: c["loss"] for c in step["candidates"]} == {i: round(v, 6) for i, v in losses.items()}
    assert ctx.plan.groups == reference.plan.groups


def test_laco_add_bos_null_uses_the_tokenizers_own_special_tokens() -> None:
    """The released notebook calls ``tokenizer(s)``; ``add_bos: null`` reproduces exactly that."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    from layerfold.methods.laco import tokenize_sentences

    backend = Tokenizer(models.WordLevel({"<s>": 0, "a": 1, "b": 2, "<unk>": 3}, unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    from tokenizers import pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    assert [t.tolist() for t in tokenize_sentences(tokenizer, ["a b"], None)] == [tokenizer("a b")["input_ids"]] == [[0, 1, 2]]
    assert [t.tolist() for t in tokenize_sentences(tokenizer, ["a b"], False)] == [[1, 2]]
    assert [t.tolist() for t in tokenize_sentences(tokenizer, ["a b"], True)] == [[0, 1, 2]]
