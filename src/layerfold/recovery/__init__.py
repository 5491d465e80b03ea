"""Recovery: train what a compression method left behind, driven by ``plan.json`` (one engine for every method)."""

from layerfold.recovery.engine import RecoveryEngine, peak_flops
from layerfold.recovery.errors import RecoveryConfigError
from layerfold.recovery.local import local_span_losses
from layerfold.recovery.spans import PlanMismatchError, Span, plan_spans, trainable_layers

__all__ = [
    "PlanMismatchError", "RecoveryConfigError", "RecoveryEngine", "Span", "local_span_losses", "peak_flops",
    "plan_spans", "trainable_layers",
]
