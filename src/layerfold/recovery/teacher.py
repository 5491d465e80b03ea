"""The teacher's side of layer-local distillation: where a span's target hidden states come from.

A layer-local phase needs, for every trained span, the dense teacher's hidden state entering it (with the
keyword arguments the teacher's decoder layer received there: the causal mask the model built, the rotary
``position_embeddings`` from its own ``rotary_emb``, ``position_ids``) and the hidden state leaving it.
:class:`SpanTargets` is that contract. :class:`LiveTeacher` implements it with a resident teacher, hooked
(:class:`TeacherTaps`) and run forward on every batch (host memory O(batch), never O(dataset));
:class:`layerfold.recovery.layer_major.StoredTargets` implements it with the boundaries of every block computed
once layer by layer (``hardware=sequential``). The engine's loop does not know which one it reads.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PreTrainedModel

from layerfold.capture.hooks import StopForward, hidden_from, hidden_into
from layerfold.models.adapters import get_adapter
from layerfold.recovery.spans import Span

class SpanTargets(Protocol):
    """The teacher's side of a layer-local loss: for each span, the hidden state entering it (with the
    keyword arguments the teacher's decoder layer received there) and the hidden state leaving it."""

    def fetch(self, split: str, rows: torch.Tensor, input_ids: torch.Tensor,
              spans: list[Span]) -> tuple[dict[int, tuple[torch.Tensor, dict]], dict[int, torch.Tensor]]:
        """``(inputs[span.start], outputs[span.end])`` on the training device for rows ``rows`` of ``split``
        (``train`` or ``val``), whose token ids are ``input_ids``."""

    def teacher_flops_per_token(self, spans: list[Span]) -> float:
        """Teacher FLOPs spent per training token inside the loop (0 when the targets were computed beforehand)."""


class TeacherTaps:
    """Hooks on the teacher capturing span inputs (with the layer's call kwargs) and span outputs."""

    def __init__(self, teacher: PreTrainedModel, spans: list[Span]) -> None:
        self.layers = get_adapter(teacher).get_layers(teacher)
        self.spans = spans
        self.inputs: dict[int, tuple[torch.Tensor, dict]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.last = max(s.end for s in spans) - 1
        self._handles: list = []

    def __enter__(self) -> TeacherTaps:
        for start in {s.start for s in self.spans}:
            def save_input(module, args, kwargs, start=start):
                hidden = hidden_into(args, kwargs)
                self.inputs[start] = (hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            self._handles.append(self.layers[start].register_forward_pre_hook(save_input, with_kwargs=True))
        for end in {s.end for s in self.spans}:
            def save_output(module, args, output, end=end):
                self.outputs[end] = hidden_from(output).detach()
                if end - 1 == self.last:
                    raise StopForward  # every target of the batch is captured
            self._handles.append(self.layers[end - 1].register_forward_hook(save_output))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def run(self, teacher: PreTrainedModel, input_ids: torch.Tensor) -> None:
        self.inputs.clear()
        self.outputs.clear()
        try:
            teacher(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass


class LiveTeacher:
    """:class:`SpanTargets` from a resident teacher: one hooked forward per batch (stopped after the last span)."""

    def __init__(self, teacher: PreTrainedModel) -> None:
        self.teacher = teacher

    def fetch(self, split: str, rows: torch.Tensor, input_ids: torch.Tensor,
              spans: list[Span]) -> tuple[dict[int, tuple[torch.Tensor, dict]], dict[int, torch.Tensor]]:
        with TeacherTaps(self.teacher, spans) as taps:
            taps.run(self.teacher, input_ids)
        return dict(taps.inputs), dict(taps.outputs)

    def teacher_flops_per_token(self, spans: list[Span]) -> float:
        layers = get_adapter(self.teacher).get_layers(self.teacher)
        return 2 * sum(p.numel() for i in range(max(s.end for s in spans)) for p in layers[i].parameters())

