"""Drop the last ``n`` decoder layers (keeping the final norm and LM head): the simplest baseline."""

from dataclasses import dataclass, field

from layerfold.methods import MethodCapabilities, MethodContext, check_target, register


@dataclass
class DropLastConfig:
    name: str = "drop_last"
    num_remove: int = field(default=8, metadata={"ge": 1, "lt": "num_layers"})


@register("drop_last", DropLastConfig, capabilities=MethodCapabilities(edit="remove"))
def drop_last(ctx: MethodContext, cfg: DropLastConfig) -> dict:
    check_target(ctx, cfg.num_remove)
    chosen = list(range(ctx.num_layers - cfg.num_remove, ctx.num_layers))
    ctx.remove(chosen)
    return {"removed_layers": chosen}
