"""layerfold's lm-eval model: lm-eval's ``HFLM`` around an in-memory model, minus its per-request overhead.

Two things in ``HFLM`` cost far more than the model's forward on a small model and a fast device:

1. **Tokenization.** ``HFLM`` encodes each (context, continuation) request with two separate calls;
   a multiple-choice question sends its context once per choice (MMLU 5-shot: 4 x ~600 tokens), and a
   further model tokenizes the same strings again. Here every distinct string is tokenized once, in
   batches, and kept per tokenizer (in memory, and on disk beside lm-eval's request cache).
2. **Scoring.** After each batched forward, ``HFLM._loglikelihood_tokens`` picks every request apart
   with half a dozen small device operations and two host synchronisations per request (slice,
   argmax, compare, gather, sum, ``float()``) — ~125k requests for the full suite. The vectorised
   scorer keeps lm-eval's batches exactly (same ``Collator`` order, same batch size, same right-padded
   input tensor, same ``log_softmax`` over the whole batch, so the log-probabilities are the same
   numbers) and replaces only the per-request loop: one gather of every continuation token's
   log-probability and one argmax at every continuation position per batch, one copy to the host, then
   per request the same ``sum`` lm-eval takes (on the host copy). ``scoring: lm_eval`` keeps lm-eval's
   own loop, and a test checks both give identical (log-likelihood, is-greedy) pairs.
3. **Logits nobody reads.** lm-eval takes a full-vocabulary ``log_softmax`` at every position of
   every sequence, then reads only the continuation's positions (MMLU 5-shot: the last of a several-hundred-token prompt). The
   vectorised scorer keeps the positions some request of the batch reads and normalises those rows
   only; ``log_softmax`` normalises each row on its own, so these are lm-eval's numbers exactly.
   ``head_rows: read`` goes further and has the model project only those positions onto the
   vocabulary (``logits_to_keep``, the model's own forward): each kept row is the same hidden state
   times the same head, but a matrix product of another height may sum in another order (on the CPU
   in fp32 the log-likelihoods move by ~1e-6), so it is checked request by request on the full suite
   (``benchmarks/eval_breakdown.py --mode check``) before it is used. A model whose forward takes no
   ``logits_to_keep`` gets every position's logits.
4. **Launches.** A 135M model's forward over 64 short sequences (the zero-shot tasks) is bound by
   the host: ~40 ms of Python module calls and kernel launches, 30 layers' worth (profiled on an H100).
   ``batch_tokens`` batches by padded tokens instead of by a fixed count (lm-eval's order kept): many
   short sequences per forward, few long ones. Rows of other batches go through matrix products of
   other heights, so this too is checked request by request against lm-eval at its own batch size.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from array import array
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SCORING_MODES = ("vectorised", "lm_eval")
HEAD_ROWS = ("all", "read")
TOKEN_CACHE_FORMAT = 2  # 2: data-only npz with a sha256 (1 was a pickle, never read)


# ----------------------------------------------------------------------------- token cache


def tokenizer_key(tokenizer: Any) -> str:
    """Identity of a tokenizer's behaviour (vocabulary, merges, normaliser, special-token handling)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = (type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None), tokenizer.bos_token, tokenizer.eos_token)
    return hashlib.sha256((spec + repr(extra)).encode()).hexdigest()


def token_cache_file(cache_dir: Path, lm: Any) -> Path:
    """Where the token cache of ``lm``'s tokenization lives inside a request-cache directory.

    Named after everything ``HFLM.tok_encode`` output depends on besides the string: the tokenizer
    (:func:`tokenizer_key`), HFLM's ``add_bos_token`` and prefix token, and the tokenizers /
    transformers versions. The directory itself is keyed by the task data (``request_cache_key``).
    """
    import tokenizers
    import transformers

    parts = (TOKEN_CACHE_FORMAT, tokenizer_key(lm.tokenizer), getattr(lm, "add_bos_token", None), lm.prefix_token_id,
             tokenizers.__version__, transformers.__version__)
    return Path(cache_dir) / f"tokens-{hashlib.sha256(repr(parts).encode()).hexdigest()[:16]}.npz"


def _token_cache_digest(keys_json: bytes, flat: Any, ends: Any) -> str:
    digest = hashlib.sha256(b"layerfold-token-cache")
    for part in (keys_json, flat.tobytes(), ends.tobytes()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def load_token_cache(path: Path, into: dict) -> int:
    """Add the entries of a token cache written by :func:`save_token_cache` to ``into``; 0 if none.

    The file is data only (``numpy.load(allow_pickle=False)``: integer arrays and the keys as JSON
    bytes), so nothing in it can run. It is used only when its layout and its sha256 over keys and
    tokens check out; anything else (a truncated write, a foreign or planted file) is ignored with a
    warning that names it, and the tokens are computed again and written over it after this run.
    """
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            fmt, digest = int(data["format"]), bytes(data["sha256"]).decode("ascii")
            keys_json, flat, ends = bytes(data["keys"]), data["tokens"], data["ends"]
        if fmt != TOKEN_CACHE_FORMAT:
            raise ValueError(f"format {fmt}, expected {TOKEN_CACHE_FORMAT}")
        if flat.dtype != np.int32 or ends.dtype != np.int64 or flat.ndim != 1 or ends.ndim != 1:
            raise ValueError(f"arrays of {flat.dtype}/{ends.dtype}, expected int32 tokens and int64 ends")
        if digest != _token_cache_digest(keys_json, flat, ends):
            raise ValueError("content does not match its sha256 (damaged or edited)")
        keys = [(str(text), None if special is None else bool(special)) for text, special in json.loads(keys_json)]
        if len(keys) != len(ends) or (len(ends) and (ends[-1] != len(flat) or (np.diff(ends, prepend=0) < 0).any())):
            raise ValueError("keys and token offsets disagree")
    except FileNotFoundError:
        return 0
    except Exception as error:  # noqa: BLE001 - any unreadable file is ignored the same way
        log.warning("Ignoring token cache %s (%s); it is rebuilt and rewritten after this run.", path, error)
        return 0
    start = 0
    for key, end in zip(keys, ends.tolist()):
        into.setdefault(key, array("i", flat[start:end].tobytes()))
        start = end
    return len(keys)


def save_token_cache(path: Path, cache: dict) -> None:
    """Write ``{(string, add_special_tokens): array('i') ids}`` as data only: one flat int32 array of
    tokens, the int64 end of each entry, the keys as JSON, and a sha256 over the three (checked on load)."""
    import numpy as np

    keys = list(cache)
    flat, ends = array("i"), array("q")
    for key in keys:
        flat.extend(cache[key])
        ends.append(len(flat))
    tokens = np.frombuffer(flat, dtype=np.int32) if len(flat) else np.zeros(0, dtype=np.int32)
    offsets = np.frombuffer(ends, dtype=np.int64) if len(ends) else np.zeros(0, dtype=np.int64)
    keys_json = json.dumps([[text, special] for text, special in keys], ensure_ascii=False).encode("utf-8")
    digest = _token_cache_digest(keys_json, tokens, offsets)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, format=np.array(TOKEN_CACHE_FORMAT), sha256=np.frombuffer(digest.encode("ascii"), dtype=np.uint8),
                 keys=np.frombuffer(keys_json, dtype=np.uint8), tokens=tokens, ends=offsets)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the model wrapper


def make_lm(model: Any, tokenizer: Any, batch_size: int | str, max_length: int | None, token_cache: dict | None,
            scoring: str = "vectorised", head_rows: str = "all", batch_tokens: int | None = None) -> Any:
    """lm-eval's ``HFLM`` around an in-memory model.

    ``token_cache`` (one dict per tokenizer, or None for lm-eval's own tokenization) keeps every string's
    tokens for further models; ``scoring`` is ``vectorised`` (one pass per batch) or ``lm_eval``;
    ``head_rows`` (vectorised only) is ``all`` (the LM head over every position, as lm-eval, so every
    number is lm-eval's) or ``read`` (the head over the positions requests read; the same up to the
    order a matrix product of another height sums in, see the module docstring); ``batch_tokens``
    (vectorised only) replaces the fixed ``batch_size`` by a budget of padded tokens per forward
    (module docstring, 4.).
    """
    if hasattr(model, "make_lm"):  # a model that runs another way (layer by layer: layerfold.evaluation.lm_eval_layerwise)
        return model.make_lm(tokenizer, batch_size, max_length, token_cache, scoring, head_rows, batch_tokens)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import Collator, _add_special_kwargs, has_bos_prefix

    if scoring not in SCORING_MODES:
        raise ValueError(f"eval.lm_eval.scoring={scoring!r} is not one of {SCORING_MODES}; "
                         "use vectorised (default) or lm_eval (lm-eval's per-request loop, for checking).")
    if batch_tokens is not None and (scoring != "vectorised" or batch_tokens < 1):
        raise ValueError(f"eval.lm_eval.batch_tokens={batch_tokens!r} needs eval.lm_eval.scoring=vectorised (got {scoring!r}) "
                         "and a positive number of tokens; set it to null for lm-eval's fixed batch size.")
    if head_rows not in HEAD_ROWS:
        raise ValueError(f"eval.lm_eval.head_rows={head_rows!r} is not one of {HEAD_ROWS}; use all (default: "
                         "lm-eval's numbers exactly) or read (the LM head only where a request reads).")

    class LayerfoldLM(HFLM):
        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs: Any) -> list[int]:
            if token_cache is None or kwargs or left_truncate_len:
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            key = (string, add_special_tokens)
            hit = token_cache.get(key)
            if hit is None:
                hit = token_cache[key] = array("i", super().tok_encode(string, add_special_tokens))
            return list(hit)

        def _special_kwargs(self, string: str, bos: str) -> dict[str, bool]:
            # exactly HFLM.tok_encode's choice for add_special_tokens=None
            kwargs = _add_special_kwargs(None, self.add_bos_token)
            if has_bos_prefix(string, bos):
                kwargs["add_special_tokens"] = False
            return kwargs

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            if token_cache is None:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            self._tokenize_in_batches(requests)
            # HFLM.loglikelihood + _encode_pair on cache hits, without converting each request's tokens to
            # a list of Python ints (MMLU: 4 x ~600 per question): the vectorised scorer reads arrays
            encoded = [self._encode_cached(context, continuation) for context, continuation in (r.args for r in requests)]
            if scoring == "lm_eval":
                encoded = [(strings, list(context), list(continuation)) for strings, context, continuation in encoded]
            return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

        def _encode_cached(self, context: str, continuation: str) -> tuple[tuple[str, str], Any, Any]:
            strings = (context, continuation)
            if not context:  # HFLM's empty-context branch, as it is
                continuation_enc = self.tok_encode(continuation, add_special_tokens=False)
                if self.prefix_token_id != continuation_enc[0]:
                    return strings, [self.prefix_token_id], continuation_enc
                return strings, continuation_enc[:1], continuation_enc[1:]
            context, continuation = _split_pair(context, continuation)
            whole = token_cache[(context + continuation, None)]
            context_enc = token_cache[(context, None)]
            return strings, context_enc, whole[len(context_enc):]

        def _tokenize_in_batches(self, requests: list[Any]) -> None:
            # Tokenize the strings _encode_pair will ask for (context + continuation, and context, after
            # moving the context's trailing spaces to the continuation as it does) in calls of 2048
            # strings instead of two calls per request; HFLM then proceeds unchanged on cache hits.
            wanted: dict[str, None] = {}
            for context, continuation in (req.args for req in requests):
                if not context:
                    continue
                context, continuation = _split_pair(context, continuation)
                for string in (context + continuation, context):
                    if (string, None) not in token_cache:
                        wanted[string] = None
            bos = self.tokenizer.decode(self.prefix_token_id)
            groups: dict[tuple, list[str]] = defaultdict(list)
            for string in wanted:
                groups[tuple(sorted(self._special_kwargs(string, bos).items()))].append(string)
            for kwargs, strings in groups.items():
                for i in range(0, len(strings), 2048):
                    chunk = strings[i:i + 2048]
                    for string, ids in zip(chunk, self.tokenizer(chunk, **dict(kwargs))["input_ids"]):
                        token_cache[(string, None)] = array("i", ids)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            if scoring == "lm_eval" or self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            return _vectorised_loglikelihood(self, Collator, requests, disable_tqdm, override_bs, head_rows, batch_tokens)

    return LayerfoldLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _split_pair(context: str, continuation: str) -> tuple[str, str]:
    """``HFLM._encode_pair``'s split: the context's trailing spaces move to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def _token_array(tokens: Any) -> array:
    return tokens if isinstance(tokens, array) else array("i", tokens)


def _sort_key(request: tuple) -> tuple:
    # lm-eval's order: longest first, ties by the tokens themselves (arrays of the same type compare
    # element by element like the tuples lm-eval builds, without a Python int per token)
    tokens = _token_array(request[1]) + _token_array(request[2])
    return -len(tokens), tokens


def _group_key(request: tuple) -> Any:
    # lm-eval's grouping: requests sharing context + continuation[:-1] share one forward
    return _token_array(request[-2]) + _token_array(request[-1])[:-1]


def _keeps_logits(model: Any) -> bool:
    """Whether ``model``'s forward can project only some positions onto the vocabulary."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _logits_at(lm: Any, batch: torch.Tensor, positions: torch.Tensor | None, head_on_read_rows: bool) -> torch.Tensor:
    """The logits at ``positions`` (every position when None), under HFLM's ``_model_call`` settings.

    ``head_on_read_rows``: the model projects only those positions (``logits_to_keep``); otherwise it
    projects every position, as lm-eval does, and the rest are dropped before the ``log_softmax``.
    """
    if positions is None:
        return lm._model_call(batch)
    if not head_on_read_rows:
        return lm._model_call(batch)[:, positions]
    with torch.no_grad(), torch.autocast(device_type=lm.device.type, dtype=lm.mixed_precision_dtype,
                                         enabled=lm.mixed_precision_dtype is not None):
        # use_cache=False: nothing reads the keys and values a cache would keep (same attention inputs)
        return lm.model(batch, logits_to_keep=positions, use_cache=False).logits


def _token_budget_chunks(ordered: list, batch_tokens: int, max_length: int) -> Iterator[list]:
    """Consecutive requests of lm-eval's order, as many per batch as keep rows x the batch's longest
    input within ``batch_tokens`` (the order is longest first, so the first row is the longest)."""
    start = 0
    while start < len(ordered):
        _, context, continuation = ordered[start]
        width = min(len(context) + len(continuation) - 1, max_length)
        rows = max(1, batch_tokens // max(width, 1))
        yield ordered[start:start + rows]
        start += rows


@torch.no_grad()
def _vectorised_loglikelihood(lm: Any, collator_cls: type, requests: list, disable_tqdm: bool,
                              override_bs: int | None, head_rows: str = "all",
                              batch_tokens: int | None = None) -> list[tuple[float, bool]]:
    """``HFLM._loglikelihood_tokens`` for a causal model with the per-request device work batched.

    Mirrors lm-eval 0.4's loop step by step: the same ``Collator`` (sort order, context grouping),
    batch size (fixed, or lm-eval's own ``auto`` scheduler), left truncation to ``max_length + 1``,
    right padding with token 0, ``log_softmax`` in ``softmax_dtype``; then, per request: its
    continuation slice ends at its input length; greedy is checked on the slice's last
    ``len(continuation)`` positions and log-probabilities are gathered from its first ones (as
    ``get_cache`` hands a group's shared slice to each member); the answer is
    ``(float(sum of those log-probabilities), all greedy)``, the sum taken by torch on the same values.
    Only the positions some request reads are projected onto the vocabulary (module docstring, 3.).
    """
    from tqdm.auto import tqdm

    collator = collator_cls(requests, sort_fn=_sort_key, group_by="contexts" if lm.logits_cache else None,
                            group_fn=_group_key)
    n_requests = len(collator)
    batch_size = lm.batch_size if lm.batch_size != "auto" else (override_bs if override_bs is not None else 0)
    batch_fn = lm._batch_scheduler if lm.batch_size == "auto" and n_requests > 0 and not override_bs else None
    if batch_fn is not None:
        lm.batch_sizes = {}  # as lm-eval: detect against this request set, not a previous one
    max_length = lm.max_length
    head_on_read_rows = head_rows == "read" and _keeps_logits(lm.model)
    placeholder = torch.empty(1, 1, 1)  # get_cache only needs something to expand per group member
    answers: list[tuple[float, bool]] = []
    progress = tqdm(total=len(requests), disable=disable_tqdm or lm.rank != 0, desc="Scoring requests")
    warned = False
    if batch_tokens is None:
        chunks = collator.get_batched(n=batch_size, batch_fn=batch_fn)
    else:  # lm-eval's order, cut by padded tokens: n=0 hands over every request in one list
        chunks = _token_budget_chunks(next(iter(collator.get_batched(n=0)), []), batch_tokens, max_length)
    for chunk in chunks:
        inputs, lengths = [], []
        for _, context, continuation in chunk:
            if not context or not continuation or len(continuation) > max_length:
                raise ValueError(f"lm-eval request with an empty or over-long part: {len(context)} context / "
                                 f"{len(continuation)} continuation tokens (max_length {max_length}).")
            tokens = (_token_array(context) + _token_array(continuation))[-(max_length + 1):][:-1]
            if len(context) + len(continuation) > max_length + 1 and not warned:
                log.warning("A request exceeds max_length=%d; truncating from the left as lm-eval does.", max_length)
                warned = True
            inputs.append(tokens)
            lengths.append(len(tokens))
        width = max(lengths)
        batch = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, tokens in enumerate(inputs):
            batch[row, : len(tokens)] = torch.frombuffer(tokens, dtype=torch.int32)

        # Every (row, position, token) to gather and every (row, position, token) whose greedy choice is checked.
        members: list[tuple[Any, int, int]] = []  # (request strings, first gathered index, count)
        gather_rows, gather_pos, gather_tok = [], [], []
        greedy_rows, greedy_pos, greedy_tok = [], [], []
        read = set()  # positions some request reads: the slice lm-eval keeps, logits[length - contlen : length]
        for row, ((request_str, context, continuation), length) in enumerate(zip(chunk, lengths)):
            start = length - len(continuation)
            read.update(range(start, length))
            for member_str, member_cont, _ in collator.get_cache(req_str=request_str, cxt_toks=context,
                                                                    cont_toks=continuation, logits=placeholder):
                count = len(member_cont)
                members.append((member_str, len(gather_tok), count))
                gather_rows += [row] * count
                gather_pos += range(start, start + count)
                gather_tok += member_cont
                greedy_rows += [row] * count
                greedy_pos += range(length - count, length)
                greedy_tok += member_cont
        if len(read) < width:
            kept = sorted(read)
            column = dict(zip(kept, range(len(kept))))  # position -> its column among the kept logits
            gather_pos, greedy_pos = [column[p] for p in gather_pos], [column[p] for p in greedy_pos]
            positions = torch.tensor(kept, device=lm.device)
        else:
            positions = None
        logprobs = F.log_softmax(_logits_at(lm, batch.to(lm.device), positions, head_on_read_rows), dim=-1,
                                 dtype=lm.softmax_dtype)
        device = logprobs.device
        rows = torch.tensor(gather_rows, device=device)
        gathered = logprobs[rows, torch.tensor(gather_pos, device=device), torch.tensor(gather_tok, device=device)]
        argmax = logprobs[torch.tensor(greedy_rows, device=device), torch.tensor(greedy_pos, device=device)].argmax(-1)
        hits = (argmax == torch.tensor(greedy_tok, device=device)).cpu()
        gathered = gathered.cpu()
        for member_str, first, count in members:
            answer = (float(gathered[first:first + count].sum()), bool(hits[first:first + count].all()))
            answers.append(answer)
            if member_str is not None:
                lm.cache_hook.add_partial("loglikelihood", member_str, answer)
        progress.update(len(members))
        del logprobs
    progress.close()
    return collator.get_original(answers)
