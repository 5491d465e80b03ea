"""The vectorised scorer returns exactly lm-eval's (log-likelihood, is-greedy) for every request.

Requests are built to hit every branch of lm-eval's loop: multi-token continuations of many lengths,
one-token continuations sharing a context (lm-eval scores a group with one forward), a group whose
members split context and continuation differently, requests longer than ``max_length`` (left
truncation), greedy continuations, and batch sizes that leave a ragged last batch.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from layerfold.evaluation.lm import make_lm

VOCAB = 96


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t3")


def _model(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).to(dtype).eval()


def _requests(model: LlamaForCausalLM, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(4, VOCAB) for _ in range(n)]

    requests = []
    for _ in range(40):  # independent multi-token continuations
        requests.append((tokens(rng.randrange(1, 30)), tokens(rng.randrange(1, 6))))
    for _ in range(12):  # multiple choice with one-token answers: one group per context
        context = tokens(rng.randrange(5, 40))
        requests += [(context, [choice]) for choice in rng.sample(range(4, VOCAB), 4)]
    for _ in range(4):  # one group, two splits: context + continuation[:-1] identical
        shared = tokens(10)
        requests += [(shared[:7], shared[7:] + [rng.randrange(4, VOCAB)]), (shared, [rng.randrange(4, VOCAB)])]
    for _ in range(6):  # longer than max_length=48: truncated from the left
        requests.append((tokens(rng.randrange(45, 70)), tokens(rng.randrange(1, 4))))
    context = tokens(12)  # a greedy continuation, so is_greedy is True at least once
    with torch.no_grad():
        greedy = model(torch.tensor([context])).logits[0, -1].float().argmax().item()
    requests.append((context, [greedy]))
    rng.shuffle(requests)
    return [((f"ctx{i}", f"cont{i}"), ctx, cont) for i, (ctx, cont) in enumerate(requests)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_vectorised_equals_lm_eval_loop(dtype: torch.dtype, batch_size: int) -> None:
    model, tokenizer = _model(dtype), _tokenizer()
    requests = _requests(model)
    stock = make_lm(model, tokenizer, batch_size, 48, None, scoring="lm_eval")._loglikelihood_tokens(requests, disable_tqdm=True)
    fast = make_lm(model, tokenizer, batch_size, 48, None, scoring="vectorised")._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(fast) == len(stock) == len(requests)
    assert fast == stock  # floats compared exactly, request by request, in the caller's order
    assert any(greedy for _, greedy in fast) and not all(greedy for _, greedy in fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_head_on_read_rows_matches_lm_eval_loop(dtype: torch.dtype, batch_size: int) -> None:
    """``head_rows=read`` projects only the positions requests read: the same hidden states times the
    same head, so the same numbers up to the summation order of a shorter matrix product (fp32 on the
    CPU moves a few log-likelihoods by ~1e-6); greedy flags, and hence accuracy, must not move."""
    model, tokenizer = _model(dtype), _tokenizer()
    requests = _requests(model)
    stock = make_lm(model, tokenizer, batch_size, 48, None, scoring="lm_eval")._loglikelihood_tokens(requests, disable_tqdm=True)
    read = make_lm(model, tokenizer, batch_size, 48, None, head_rows="read")._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [greedy for _, greedy in read] == [greedy for _, greedy in stock]
    assert [ll for ll, _ in read] == pytest.approx([ll for ll, _ in stock], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("batch_tokens", [40, 300])
def test_token_budget_batches_match_lm_eval_loop(batch_tokens: int) -> None:
    """Batches cut by padded tokens (lm-eval's order kept): every request is answered, each forward
    stays within the budget (or holds one request), and the answers are lm-eval's up to summation order."""
    model, tokenizer = _model(torch.float32), _tokenizer()
    requests = _requests(model)
    stock = make_lm(model, tokenizer, 8, 48, None, scoring="lm_eval")._loglikelihood_tokens(requests, disable_tqdm=True)
    shapes = []
    handle = model.model.register_forward_hook(lambda module, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
                                               with_kwargs=True)
    lm = make_lm(model, tokenizer, 8, 48, None, head_rows="read", batch_tokens=batch_tokens)
    fast = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    handle.remove()
    assert all(rows * width <= batch_tokens or rows == 1 for rows, width in shapes), shapes
    assert max(rows for rows, _ in shapes) > 8 if batch_tokens == 300 else True  # more rows than lm-eval's batch of 8
    assert [greedy for _, greedy in fast] == [greedy for _, greedy in stock]
    assert [ll for ll, _ in fast] == pytest.approx([ll for ll, _ in stock], rel=1e-5, abs=1e-5)


def test_token_budget_needs_the_vectorised_scorer() -> None:
    with pytest.raises(ValueError, match="eval.lm_eval.batch_tokens=512 needs eval.lm_eval.scoring=vectorised"):
        make_lm(_model(torch.float32), _tokenizer(), 4, 48, None, scoring="lm_eval", batch_tokens=512)


def test_head_on_read_rows_projects_fewer_rows() -> None:
    """The point of ``head_rows=read``: the head sees the read positions, not every position."""
    model, tokenizer = _model(torch.float32), _tokenizer()
    requests = _requests(model)
    rows = {}
    for head_rows in ("all", "read"):
        seen = []
        handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
        make_lm(model, tokenizer, 7, 48, None, head_rows=head_rows)._loglikelihood_tokens(requests, disable_tqdm=True)
        handle.remove()
        rows[head_rows] = sum(seen)
    assert rows["read"] < rows["all"] / 3, rows


def test_unknown_scoring_mode_is_named() -> None:
    with pytest.raises(ValueError, match="eval.lm_eval.scoring='fast'.*vectorised"):
        make_lm(_model(torch.float32), _tokenizer(), 4, 48, None, scoring="fast")
    with pytest.raises(ValueError, match="eval.lm_eval.head_rows='some'.*all.*read"):
        make_lm(_model(torch.float32), _tokenizer(), 4, 48, None, head_rows="some")
