"""Learning-rate schedule: linear warmup, then cosine decay to a floor, stepped once per optimiser step.

LLM-Streamline's released schedules are given horizons in micro-batches and step per optimiser step
(so the LR barely decays) or per micro-batch with half the horizon (so it decays and rises again).
Here the horizon is the number of optimiser steps the phase will take, and the scheduler steps after
each of them, so the LR reaches ``min_lr`` exactly at the end and never rises.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float, lr: float, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, total, warmup, lr, min_lr) / lr)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`warmup_cosine` from the optimiser's own learning rate (recovery's default ``schedule`` component)."""
    return warmup_cosine(optimizer, total_steps, warmup_ratio, optimizer.defaults["lr"], min_lr)
