"""Prune&Comp (Chen et al., AAAI 2026; arXiv 2507.18212): rescale what removal leaves of the stream's magnitude.

Removing layers ``a .. b - 1`` leaves the stream entering the next kept layer at the magnitude of dense
boundary ``a`` where that layer was trained on boundary ``b``'s; the residual stream grows with depth, so
it arrives too small next to what later layers add. Prune&Comp estimates the gap on calibration data and
removes it by rescaling weights offline (no runtime cost). Its paper's text was not available to
layerfold beyond its abstract; this is the construction that does exactly that, with the choices stated:

- **The gap** at each interface is the scalar ``alpha = E_t ||h_b|| / E_t ||m||``: the mean token L2 norm
  of the dense stream at boundary ``b`` over the mean norm ``m`` of the compressed stream where it enters the
  interface. ``measure: compressed`` (default) reads ``m`` on the compressed model with the earlier
  interfaces already compensated, one pass through the kept layers (the prune -> compensate -> measure
  order of an iterative loop); ``measure: dense`` reads ``m`` as the dense boundary ``a`` (each interface
  as if it were the only one). ``ignore_first`` leaves out the first positions (an attention-sink BOS
  token's norm can dominate a mean).
- **The rescale.** Multiplying the stream entering an interface by ``alpha`` is the same function as
  dividing everything written after it by ``alpha``: every later layer reads the stream through a
  normalisation that ignores its scale (RMSNorm and LayerNorm, up to their epsilon), and so does the
  final norm before the LM head. So each kept layer after interfaces ``1..k`` gets its attention and MLP
  output projections (weights and biases) multiplied by ``c = 1 / (alpha_1 ... alpha_k)``
  (:class:`~layerfold.surgery.fold.WriteScale`): no embedding or LM head is touched, so a tied embedding
  stays tied, and the output is a stock checkpoint. An interface after the last kept layer changes
  nothing (the final norm would undo it); its ``alpha`` is reported.

The iterative *selection* loop of the paper (prune one layer, compensate, re-score, prune the next) is a
property of the removal method; applied after any method, this compensates the removal set that method
chose, interface by interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layerfold.compensate import DenseStack, Interface, mean_token_norm, register, token_rows
from layerfold.surgery.fold import WriteScale


@dataclass
class PruneCompConfig:
    name: str = "prune_comp"
    measure: str = field(default="compressed", metadata={"choices": ["compressed", "dense"]})
    ignore_first: int = field(default=0, metadata={"ge": 0})  # leading positions left out of the norms


@register("prune_comp", PruneCompConfig, stock=True, layer_major=True)
def prune_comp(dense: DenseStack, cfg: PruneCompConfig, found: list[Interface]) -> dict:
    ctx = dense.ctx
    if not found:
        return {"alphas": [], "scales": []}
    targets = dense_norms(dense, sorted({i.after for i in found} | ({i.before for i in found} if cfg.measure == "dense" else set())),
                          cfg.ignore_first)
    alphas, measured = [], []
    if cfg.measure == "dense":
        for interface in found:
            measured.append(targets[interface.before])
            alphas.append(targets[interface.after] / targets[interface.before])
    else:
        run, acts = dense.compressed()
        position = 0
        for interface in found:
            run.run_layers(acts, position, interface.position)
            position = interface.position
            norm = mean_token_norm(acts, cfg.ignore_first)
            alpha = targets[interface.after] / norm
            measured.append(norm)
            alphas.append(alpha)
            acts.update(lambda b, hidden, alpha=alpha: hidden * alpha)
    writes = (ctx.adapter.attn_output, ctx.adapter.mlp_output)
    scales = []
    scale = 1.0
    bounds = [i.position for i in found] + [ctx.num_layers + 1]
    for k, interface in enumerate(found):
        scale /= alphas[k]
        for layer in range(interface.position, min(bounds[k + 1], ctx.num_layers)):
            ctx.stand_in(layer, [], WriteScale(writes, scale, source="prune_comp"))
        scales.append(scale)
    return {
        "alphas": [round(a, 6) for a in alphas],
        "measured_norm": [round(m, 6) for m in measured],
        "target_norm": [round(targets[i.after], 6) for i in found],
        "write_scales": [round(s, 6) for s in scales],  # of the layers from each interface to the next
    }


def dense_norms(dense: DenseStack, boundaries: list[int], ignore_first: int) -> dict[int, float]:
    """Mean token L2 norm of the dense stream at each of ``boundaries``, one pass up to the last of them."""
    sums = {b: torch.zeros((), dtype=torch.float64) for b in boundaries}
    counts = dict.fromkeys(boundaries, 0)

    def add(boundary: int, batch: int, hidden: torch.Tensor) -> None:
        if boundary in sums:
            rows = token_rows(hidden, ignore_first)
            sums[boundary] += torch.linalg.vector_norm(rows.double(), dim=-1).sum().cpu()
            counts[boundary] += rows.shape[0]

    with dense.dense() as (run, acts):
        run.run_layers(acts, 0, max(boundaries), on_boundary=add)
    return {b: float(sums[b]) / max(counts[b], 1) for b in boundaries}
