"""Gromov et al. (2024), "The Unreasonable Ineffectiveness of the Deeper Layers": drop the most redundant block.

For every block of ``n`` consecutive layers starting at ``l``, the angular distance between the
residual stream entering the block (boundary ``l``) and leaving it (boundary ``l + n``) is measured
on the *last token* of each calibration sequence, ``arccos(cos(h_l, h_{l+n})) / pi``, averaged over
sequences. Layers ``l*, ..., l* + n - 1`` of the block with the smallest distance are removed in one
shot (ties go to the later block).

The paper then "heals" the pruned model with QLoRA; that is not part of this method but of a later
recovery stage of the pipeline.
"""

from dataclasses import dataclass, field

from layerfold.methods import CaptureReads, MethodCapabilities, MethodContext, check_target, register
from layerfold.scoring.similarity import block_angular_distance, lowest
from layerfold.surgery import LayerSurgeryError


@dataclass
class GromovConfig:
    name: str = "gromov"
    num_remove: int = field(default=8, metadata={"ge": 1, "lt": "num_layers"})  # n: size of the contiguous block removed


@register("gromov", GromovConfig, capabilities=MethodCapabilities(edit="remove", reads=CaptureReads(("last_token_angular",))))
def gromov(ctx: MethodContext, cfg: GromovConfig) -> dict:
    check_target(ctx, cfg.num_remove)
    angular = ctx.dense_stats().last_token_angular
    if angular.shape[0] != ctx.num_layers + 1:
        raise LayerSurgeryError(
            f"The statistics cover {angular.shape[0] - 1} layers but the model has {ctx.num_layers}; "
            "capture them from the model being compressed."
        )
    n = cfg.num_remove
    distance = block_angular_distance(angular, n)
    start = lowest(distance, 1)[0]
    chosen = list(range(start, start + n))
    ctx.remove(chosen)
    return {
        "block_angular_distance": [round(float(v), 6) for v in distance],  # index = first layer of the block
        "chosen_start": start,
        "chosen_distance": round(float(distance[start]), 6),
        "removed_layers": chosen,
    }
