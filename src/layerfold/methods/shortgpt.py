"""ShortGPT (Men et al., 2024): remove the ``n`` layers with the lowest Block Influence, in one shot.

``BI_i = 1 - E_t[cos(h_i, h_{i+1})]`` over calibration tokens, with ``h`` the pre-norm residual stream.
The released code reads Hugging Face ``hidden_states``, whose last entry is the final norm's output, so its
last layer's BI differs from layerfold's wherever the final norm's weight is not constant across channels
(a documented departure; no parity option: layerfold's BI of the last layer reads the layer's own output).
"""

from dataclasses import dataclass, field

from layerfold.methods import CaptureReads, MethodCapabilities, MethodContext, check_target, register
from layerfold.scoring.similarity import block_influence, lowest


@dataclass
class ShortGPTConfig:
    name: str = "shortgpt"
    num_remove: int = field(default=8, metadata={"ge": 1, "lt": "num_layers"})


# Block Influence: each layer's input against its output, one layer apart.
@register("shortgpt", ShortGPTConfig, capabilities=MethodCapabilities(edit="remove", reads=CaptureReads(("cosine",), cosine_distance=1)))
def shortgpt(ctx: MethodContext, cfg: ShortGPTConfig) -> dict:
    check_target(ctx, cfg.num_remove)
    bi = block_influence(ctx.dense_stats().cosine)
    chosen = lowest(bi, cfg.num_remove)
    ctx.remove(chosen)
    return {"block_influence": [round(float(v), 6) for v in bi], "removed_layers": chosen}
