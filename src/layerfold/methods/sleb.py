"""SLEB (Song et al., ICML 2024): remove whole blocks one at a time by calibration LM loss.

At every step each remaining (unprotected) layer is removed on trial and the calibration loss of the
model without it is measured; the layer whose removal gives the lowest loss goes for good, and the
search repeats on the smaller model. The released code (jiwonsong-dev/SLEB, ``sleb.py``) sums token
NLL over fixed-length windows; the mean NLL used here ranks candidates identically. Ties go to the
earliest candidate, as the released code's strict ``<`` does.

``protect_first`` / ``protect_last`` are SLEB's ``early_barrier`` / ``latter_barrier`` (1 and 1 by
default): the first and last *original* layers are never candidates. Protection follows original
indices through :attr:`MethodContext.plan`, so it stays right after earlier edits.
"""

from dataclasses import dataclass, field

from tqdm.auto import tqdm

from layerfold.config import ConfigError
from layerfold.methods import MethodContext, check_target, register
from layerfold.scoring.loss import calibration_nll


@dataclass
class SLEBConfig:
    name: str = "sleb"
    num_remove: int = field(default=8, metadata={"ge": 1, "lt": "num_layers"})  # blocks removed, one per step
    protect_first: int = field(default=1, metadata={"ge": 0})  # early barrier: the first original layers never removed
    protect_last: int = field(default=1, metadata={"ge": 0})  # latter barrier: the last original layers never removed


@register("sleb", SLEBConfig)
def sleb(ctx: MethodContext, cfg: SLEBConfig) -> dict:
    check_target(ctx, cfg.num_remove)
    if cfg.protect_first < 0 or cfg.protect_last < 0:
        raise ConfigError("method.protect_first and method.protect_last must be >= 0.")
    total = ctx.plan.original_layers
    protected = set(range(min(cfg.protect_first, total))) | set(range(max(total - cfg.protect_last, 0), total))

    def candidates() -> list[int]:
        return [i for i, group in enumerate(ctx.plan.groups) if not protected.intersection(group)]

    if len(candidates()) < cfg.num_remove:
        raise ConfigError(
            f"method.num_remove={cfg.num_remove} but only {len(candidates())} layers are not protected "
            f"(protect_first={cfg.protect_first}, protect_last={cfg.protect_last}); lower one of them."
        )

    dense_loss = calibration_nll(ctx.model, ctx.calibration, ctx.batch_size)
    steps, removed = [], []
    for step in tqdm(range(cfg.num_remove), desc="sleb"):
        losses = {}
        for i in tqdm(candidates(), desc=f"sleb step {step + 1}", leave=False):
            with ctx.trial():
                ctx.remove([i])
                losses[i] = calibration_nll(ctx.model, ctx.calibration, ctx.batch_size)
        best = min(losses, key=lambda i: (losses[i], i))
        original = list(ctx.plan.groups[best])
        steps.append(
            {
                "step": step + 1,
                "candidates": [{"position": i, "original_layers": list(ctx.plan.groups[i]), "loss": round(v, 6)} for i, v in losses.items()],
                "removed_position": best,
                "removed_original": original,
                "loss": round(losses[best], 6),
            }
        )
        ctx.remove([best])
        removed.extend(original)
    return {
        "dense_loss": round(dense_loss, 6),
        "protected_layers": sorted(protected),
        "steps": steps,
        "removal_order": removed,  # original indices, in the order they were removed
        "removed_layers": sorted(removed),
        "final_loss": steps[-1]["loss"],
    }
