"""lm-eval on a model larger than the device: requests scored layer by layer, with the numbers of the resident run.

layerfold's lm-eval model (:func:`layerfold.evaluation.lm.make_lm`) batches requests in lm-eval's order
(fixed ``batch_size``, or a budget of padded tokens ``batch_tokens``), right-pads each batch and takes
the logits of the model's forward. Here the model's forward is replaced by the layer-major runner:

1. the requests' padded batches are built exactly as the vectorised scorer builds them (same
   ``Collator`` order and grouping, same truncation and padding);
2. consecutive batches are grouped into *chunks* of at most ``chunk_tokens`` padded tokens
   (``hardware.eval_chunk_tokens``; by default as many as ``hardware.activation_share`` of the free
   accelerator memory holds at one boundary, the whole suite on a CPU);
3. a chunk's batches are embedded, carried through every decoder layer together (each layer's weights
   read once per chunk, activations on the device or in pinned host memory as ``hardware.activations``
   says) and kept at the last boundary;
4. the scorer then asks for each batch's logits in order: final norm and LM head on that batch's last
   boundary, the family's logit scaling included (the runner's head is what the model's forward applies).

Each batch goes through the same layers with the same inputs and the same call arguments (causal mask,
rotary tables probed from the model's own forward) as in a resident forward of that batch, so every
request's log-likelihood and greedy flag is the resident run's (a test checks them one by one). The
scorer's own per-request arithmetic is unchanged. Every batch handed to the forward is checked against
the batch built in step 1, so a change in the scorer's batching fails loudly instead of scoring the
wrong rows.

Not available layer by layer: ``eval.lm_eval.scoring=lm_eval`` (lm-eval's own loop calls the model
per batch with its own batching) and ``eval.lm_eval.head_rows=read`` (the model's own
``logits_to_keep`` forward); ``validate`` refuses both under ``hardware=sequential``, and lm-eval's
``batch_size=auto`` (it probes the whole model's memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerfold.execution.entry import _setting
from layerfold.execution.layer_major import Activations, LayerMajorRunner, choose_placement
from layerfold.execution.loaders import LayerLoader, SafetensorsLayerLoader

log = logging.getLogger(__name__)


@dataclass
class LayerwiseModel:
    """A checkpoint that lm-eval scores layer by layer; passed where the evaluation takes a model.

    :func:`layerfold.evaluation.lm.make_lm` hands such an object its own settings (``make_lm`` below)
    instead of wrapping it in ``HFLM`` as a resident model.
    """

    loader: LayerLoader
    hardware: Any  # the ``hardware`` config section
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_checkpoint(cls, path: str | Path, hardware: Any, device: torch.device | str, dtype: torch.dtype) -> LayerwiseModel:
        return cls(SafetensorsLayerLoader(path), hardware, torch.device(device), dtype)

    def make_lm(self, tokenizer: Any, batch_size: int | str, max_length: int | None, token_cache: dict | None,
                scoring: str = "vectorised", head_rows: str = "all", batch_tokens: int | None = None) -> Any:
        """layerfold's lm-eval model over this checkpoint, its forward run layer by layer (module docstring)."""
        from layerfold.evaluation.lm import make_lm

        check_settings(scoring, head_rows, batch_size)
        runner = LayerMajorRunner(self.loader, self.device, self.dtype, activations=_setting(self.hardware, "activations", "auto"),
                                  prefetch=bool(_setting(self.hardware, "prefetch", False)), batch_size=2**31 - 1,
                                  activation_share=float(_setting(self.hardware, "activation_share", 0.5)))
        lm = make_lm(runner.model, tokenizer, batch_size, max_length, token_cache, scoring, head_rows, batch_tokens)
        chunk_tokens = _setting(self.hardware, "eval_chunk_tokens", None)
        forward = ChunkedForward(runner, None if chunk_tokens is None else int(chunk_tokens))
        base = type(lm)

        class LayerwiseLM(base):
            def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list:
                forward.start(padded_batches(self, requests, batch_tokens))
                try:
                    return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
                finally:
                    forward.finish()

            def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
                return forward.logits(inps)

            def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
                raise NotImplementedError("loglikelihood_rolling (perplexity tasks of lm-eval) is not scored layer by layer; "
                                          "layerfold's perplexity stage is (eval.perplexity).")

            def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
                raise NotImplementedError("generation tasks need the whole model; run them with hardware=resident.")

        lm.__class__ = LayerwiseLM
        lm.layerwise_report = runner.report
        return lm


def check_settings(scoring: str, head_rows: str, batch_size: int | str) -> None:
    """lm-eval settings the layer-by-layer forward cannot honour (``validate`` applies the same rule first)."""
    why = refusal(scoring, head_rows, batch_size)
    if why is not None:
        raise ValueError(why)


def refusal(scoring: str, head_rows: str, batch_size: int | str) -> str | None:
    """Why these ``eval.lm_eval`` settings cannot be scored layer by layer, or None."""
    if scoring != "vectorised":
        return (f"eval.lm_eval.scoring={scoring} runs lm-eval's own loop, which calls the whole model per batch; under "
                "hardware=sequential use eval.lm_eval.scoring=vectorised (the same numbers, checked request by request)")
    if head_rows != "all":
        return (f"eval.lm_eval.head_rows={head_rows} projects rows through the model's own forward; under hardware=sequential "
                "use eval.lm_eval.head_rows=all")
    if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
        return ("eval.lm_eval.batch_size=auto probes the whole model's memory; under hardware=sequential give a number "
                "(or eval.lm_eval.batch_tokens)")
    return None


def padded_batches(lm: Any, requests: list, batch_tokens: int | None) -> list[torch.Tensor]:
    """The right-padded input batches the vectorised scorer will build for ``requests``, in its order."""
    from lm_eval.models.utils import Collator

    from layerfold.evaluation.lm import _group_key, _sort_key, _token_array, _token_budget_chunks

    collator = Collator(requests, sort_fn=_sort_key, group_by="contexts" if lm.logits_cache else None, group_fn=_group_key)
    max_length = lm.max_length
    if batch_tokens is None:
        chunks = collator.get_batched(n=lm.batch_size, batch_fn=None)
    else:
        chunks = _token_budget_chunks(next(iter(collator.get_batched(n=0)), []), batch_tokens, max_length)
    batches = []
    for chunk in chunks:
        inputs = [(_token_array(context) + _token_array(continuation))[-(max_length + 1):][:-1] for _, context, continuation in chunk]
        batch = torch.zeros(len(inputs), max(len(t) for t in inputs), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            batch[row, : len(tokens)] = torch.frombuffer(tokens, dtype=torch.int32)
        batches.append(batch)
    return batches


class ChunkedForward:
    """The logits of each batch, in order, computed a chunk of batches at a time through the layers."""

    def __init__(self, runner: LayerMajorRunner, chunk_tokens: int | None) -> None:
        self.runner = runner
        self.chunk_tokens = chunk_tokens
        self.batches: list[torch.Tensor] = []
        self.next = 0
        self.chunk: tuple[int, int, Activations] | None = None  # first batch, end batch, last boundary
        self.chunks_run = 0

    def start(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.next, self.chunk = batches, 0, None

    def finish(self) -> None:
        if self.next != len(self.batches):
            log.warning("the scorer asked for %d of %d batches", self.next, len(self.batches))
        self.batches, self.chunk = [], None

    def _budget(self) -> int:
        """Padded tokens per chunk: the setting, or what ``activation_share`` of the free device memory holds at one boundary."""
        if self.chunk_tokens is not None:
            return self.chunk_tokens
        device = self.runner.device
        if device.type != "cuda":
            return 2**62  # host memory: the whole suite at once
        free, _ = torch.cuda.mem_get_info(device)
        per_token = self.runner.model.config.hidden_size * torch.empty((), dtype=self.runner.dtype).element_size()
        return max(1, int(free * self.runner.activation_share / per_token))

    @torch.no_grad()
    def _run_chunk(self, first: int) -> None:
        budget, end, tokens = self._budget(), first, 0
        while end < len(self.batches) and (end == first or tokens + self.batches[end].numel() <= budget):
            tokens += self.batches[end].numel()
            end += 1
        self.chunk = None  # the previous chunk's boundary is freed before the next one is made
        runner = self.runner
        itemsize = torch.empty((), dtype=runner.dtype).element_size()
        placement = choose_placement(runner.activations, runner.device, tokens * runner.model.config.hidden_size * itemsize,
                                     runner.activation_share)
        requested, runner.activations = runner.activations, placement  # every batch of the chunk in one place
        try:
            acts = runner.embed(self.batches[first])
            for b in range(first + 1, end):
                acts.extend(runner.embed(self.batches[b]))
        finally:
            runner.activations = requested
        runner.run_layers(acts)
        self.chunk = (first, end, acts)
        self.chunks_run += 1

    @torch.no_grad()
    def logits(self, inps: torch.Tensor) -> torch.Tensor:
        index = self.next
        if index >= len(self.batches) or not torch.equal(inps.cpu(), self.batches[index]):
            raise RuntimeError(f"the lm-eval scorer asked for a batch ({tuple(inps.shape)}) other than batch {index} of the "
                               f"{len(self.batches)} built for it; its batching and layerfold.evaluation.lm_eval_layerwise disagree.")
        if self.chunk is None or not self.chunk[0] <= index < self.chunk[1]:
            self._run_chunk(index)
        first, _, acts = self.chunk
        hidden = acts.hidden[index - first].to(self.runner.device)
        self.next += 1
        return self.runner.lm_head()(self.runner.final_norm()(hidden))
