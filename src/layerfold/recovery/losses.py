"""Training losses: layer-local (hidden state vs hidden state) and end-to-end (LM, logit KD).

A layer-local loss is a per-position distance between the student layer's output and the teacher's
hidden state leaving the span, averaged over the positions it reads (:class:`LocalLoss`). Which
positions it reads matters: the first position of a block (BOS, the attention sink) carries a
hidden state whose norm is one to two orders of magnitude above the other positions' in the middle
and upper layers of most LLMs, so a plain MSE over all positions is mostly the error at that one
position. :class:`LocalLoss` can leave leading positions out (``ignore_first``), leave out positions
whose target norm is an outlier within its sequence (``max_norm_ratio``), or use a distance that
is scale-free per position (``nmse``, ``cosine``), which weighs every position alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

LOCAL_LOSSES = ("mse", "nmse", "cosine", "kl")


def local_loss_per_position(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Distance between hidden states ``[batch, seq, hidden]`` at every position, ``[batch, seq]``, in float32.

    ``mse``: mean squared error over the hidden units (LLM-Streamline; averaged over positions it is
    the plain MSE over all elements). ``nmse``: squared error divided by the teacher's squared norm at
    that position, ``|s - t|^2 / |t|^2`` (a relative error: every position weighs the same whatever its
    norm). ``cosine``: ``1 - cos(s, t)``. ``kl``: ``T^2 KL(softmax(t / T) || softmax(s / T))`` over the
    hidden units.
    """
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    if kind == "nmse":
        return (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    if kind == "kl":
        return kl_per_token(s, t, temperature)
    raise ValueError(f"recovery.local.loss='{kind}' is unknown; choose one of {', '.join(LOCAL_LOSSES)}.")


def kept_positions(teacher: torch.Tensor, ignore_first: int = 0, max_norm_ratio: float | None = None) -> torch.Tensor:
    """The positions a layer-local loss reads, ``[batch, seq]`` booleans.

    Left out: the first ``ignore_first`` positions of every block, and, with ``max_norm_ratio``, every
    position whose target norm ``|t|`` exceeds ``max_norm_ratio`` times the median target norm of the
    positions its sequence keeps otherwise. With ``max_norm_ratio > 1`` at least half of those positions
    stay, so the loss is never empty.
    """
    batch, seq = teacher.shape[:2]
    keep = torch.ones(batch, seq, dtype=torch.bool, device=teacher.device)
    keep[:, :ignore_first] = False
    if max_norm_ratio is not None:
        norms = teacher.detach().float().norm(dim=-1)
        median = norms.masked_fill(~keep, float("nan")).nanmedian(dim=1, keepdim=True).values
        keep &= norms <= max_norm_ratio * median
    return keep


@dataclass(frozen=True)
class LocalLoss:
    """A layer-local loss: a per-position distance (``kind``) averaged over the kept positions."""

    kind: str = "mse"
    temperature: float = 1.0  # kl only
    ignore_first: int = 0
    max_norm_ratio: float | None = None  # None: no position left out for its norm

    @classmethod
    def from_config(cls, local: Any) -> LocalLoss:
        """From ``recovery.local`` (a config section or anything with those attributes)."""
        return cls(local.loss, float(local.temperature), int(local.ignore_first),
                   None if local.get("max_norm_ratio") is None else float(local.max_norm_ratio))

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        per_position = local_loss_per_position(student, teacher, self.kind, self.temperature)
        keep = kept_positions(teacher, self.ignore_first, self.max_norm_ratio)
        return (per_position * keep).sum() / keep.sum().clamp_min(1)


def local_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Distance between hidden states ``[batch, seq, hidden]`` averaged over every position, in float32."""
    return LocalLoss(kind, temperature)(student, teacher)


def kl_per_token(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the last dimension."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over predicted tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """Token-level KL from the teacher's to the student's next-token distribution (Hinton et al., ``T^2`` scaled).

    ``top_k``: only the teacher's ``k`` most likely tokens of each position, both distributions renormalised over
    them (LinearPatch's distillation keeps the teacher's top 50 logits); None: the whole vocabulary.
    """
    if top_k is not None:
        index = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1).indices
        student_logits, teacher_logits = student_logits.gather(-1, index), teacher_logits.gather(-1, index)
    return kl_per_token(student_logits, teacher_logits, temperature).mean()


@dataclass(frozen=True)
class EndToEndLoss:
    """The whole student's loss: ``lm_weight`` x next-token cross-entropy + ``kd_weight`` x logit KD to the teacher
    (``kd_temperature``, over the teacher's ``kd_top_k`` logits or all of them)."""

    lm_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    kd_top_k: int | None = None

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss reads the teacher's logits (the engine runs the teacher only then)."""
        return self.kd_weight > 0

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.lm_weight * lm_loss(logits, input_ids) if self.lm_weight > 0 else logits.new_zeros((), dtype=torch.float32)
        if self.kd_weight > 0:
            loss = loss + self.kd_weight * logit_kd(logits, teacher_logits, self.kd_temperature, self.kd_top_k)
        return loss
