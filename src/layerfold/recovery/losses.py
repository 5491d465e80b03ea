"""Training losses: layer-local (hidden state vs hidden state) and end-to-end (LM, logit KD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOCAL_LOSSES = ("mse", "cosine", "kl")


def local_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Distance between hidden states ``[batch, seq, hidden]``, averaged over tokens, computed in float32.

    ``mse``: mean squared error over all elements (LLM-Streamline). ``cosine``: ``1 - cos`` per token.
    ``kl``: ``KL(softmax(t / T) || softmax(s / T))`` over the hidden units, per token, times ``T^2``.
    """
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "kl":
        return kl_per_token(s, t, temperature).mean()
    raise ValueError(f"recovery.local.loss='{kind}' is unknown; choose one of {', '.join(LOCAL_LOSSES)}.")


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
