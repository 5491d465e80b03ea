"""The student's side of layer-local distillation: its trained layers called exactly as inside the model,
on the teacher's span inputs, and their losses against the teacher's span outputs."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from layerfold.capture.hooks import hidden_from
from layerfold.models.adapters import get_adapter
from layerfold.recovery.losses import LocalLoss
from layerfold.recovery.spans import Span
from layerfold.recovery.teacher import LiveTeacher


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run a decoder layer as the model's forward does, with the kwargs the teacher's layer received."""
    return hidden_from(layer(hidden, **kwargs))


class SpanStudent(nn.Module):
    """The student layers a layer-local phase trains, as one module: called with each span's teacher
    input and layer arguments, it returns each layer's output.

    This, not the whole student, is what DDP wraps for a layer-local phase: DDP then watches exactly the
    trained layers, all of which get a gradient on every micro-batch, and never the teacher.
    """

    def __init__(self, student: PreTrainedModel, layers: list[int]) -> None:
        super().__init__()
        decoder = get_adapter(student).get_layers(student)
        self.layers = nn.ModuleList([decoder[k] for k in layers])

    def forward(self, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
        return [call_layer(layer, hidden, kwargs) for layer, (hidden, kwargs) in zip(self.layers, inputs)]


def span_losses(span_student: nn.Module, spans: list[Span], inputs: dict[int, tuple[torch.Tensor, dict]], outputs: dict[int, torch.Tensor],
                dtype: torch.dtype, loss: LocalLoss) -> list[torch.Tensor]:
    """Layer-local ``loss`` of each span's student layer (run by ``span_student``) against the teacher's span
    ``inputs`` / ``outputs`` over the positions ``loss`` keeps; the inputs enter in the student's ``dtype``."""
    results = span_student([(inputs[s.start][0].to(dtype), inputs[s.start][1]) for s in spans])
    return [loss(out, outputs[s.end]) for out, s in zip(results, spans)]


def local_span_losses(teacher: PreTrainedModel, student: PreTrainedModel, spans: list[Span], input_ids: torch.Tensor, kind: str,
                      temperature: float = 1.0, ignore_first: int = 0, span_student: nn.Module | None = None,
                      max_norm_ratio: float | None = None) -> list[torch.Tensor]:
    """Layer-local loss of each span's student layer on one batch (teacher forward inside), over the positions
    :class:`LocalLoss` keeps (``ignore_first``, ``max_norm_ratio``).

    ``span_student`` runs the spans' student layers (the engine passes its prepared, possibly
    DDP-wrapped :class:`SpanStudent`); by default the student's own layers are called.
    """
    span_student = span_student if span_student is not None else SpanStudent(student, [s.layer for s in spans])
    inputs, outputs = LiveTeacher(teacher).fetch("train", torch.arange(input_ids.shape[0]), input_ids, spans)
    loss = LocalLoss(kind, temperature, ignore_first, max_norm_ratio)
    return span_losses(span_student, spans, inputs, outputs, next(student.parameters()).dtype, loss)

