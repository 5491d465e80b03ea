"""ReplaceMe (Shopkhoev et al., 2025; arXiv 2505.02819): remove a block of layers and fold a linear map in its place.

**Selection.** A block of ``n`` consecutive layers maps boundary ``j`` to boundary ``j + n``; the one with
the smallest distance between the two is removed. ``selection: angular`` is the released code's
statistic (``distance.py``): the angular distance ``arccos(cos) / pi`` of the last token, averaged over
sequences (Gromov et al.'s, read from the capture statistics); ``selection: cosine`` is the mean token
cosine distance ``1 - E_t cos(h_j, h_{j+n})`` over every token. ``j >= 1``: a kept layer must precede the
block, since the map is folded into it (the released code never offers ``j = 0`` either). ``start``
fixes the block instead. layerfold reads the pre-norm residual stream at every boundary; the released
code reads Hugging Face ``hidden_states``, whose last entry is the final-norm output, so only a block
ending at the last layer is compared in another space there.

**The map.** With ``p = j - 1`` the last kept layer before the block, ``M`` its MLP output, ``Y`` its
output (boundary ``j``, so ``Y - M`` is its post-attention residual) and ``L`` the dense output after the
block (boundary ``j + n``), every calibration token gives one row of

    T = argmin_T || M T - (L - Y + M) ||^2          (objective: lstsq, closed form)
    T = argmin_T  sum_t 1 - cos(M_t T, L_t - Y_t + M_t)   (objective: cosine, Adam)

so that after the block is removed, layer ``p``'s output ``(Y - M) + M T`` approximates ``L``.
``cosine_target: output`` fits ``cos(M T + Y - M, L)`` instead (the released code's ``accurate`` mode).

**Fold.** ``T`` goes into layer ``p``'s MLP output projection, ``W <- Tᵀ W`` (``b <- b T`` where it has a
bias), so the output is a stock checkpoint with the block's layers gone; ``plan.json`` records layer
``p`` as standing for itself and the block (:meth:`MethodContext.stand_in`, whose init is the fold).

**Streaming.** The least-squares fit needs ``XᵀX`` and ``XᵀY`` only (:class:`~layerfold.capture.linear_fit.NormalEquations`,
float64 sums, ``2 d^2`` numbers): resident, the calibration runs ``capture.batch_size`` sequences at a
time and nothing else is kept, so memory does not grow with the calibration set; layer-major
(``hardware=sequential``), one boundary of every sequence is held, as any layer-major pass holds it,
plus the MLP output ``M`` of every sequence until the block's end arrives. Only layers ``0 .. j + n - 1``
run. The cosine objective is iterative over tokens: it keeps ``M`` and the target of every calibration
token (``2 x tokens x d`` numbers in the compute dtype, ``3 x`` with ``cosine_target: output``), as the
released code keeps them in host memory.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from layerfold.capture.linear_fit import PRODUCT_DTYPES, NormalEquations, SingularSystemError
from layerfold.execution.layer_major import Activations, LayerMajorRunner
from layerfold.methods import CaptureReads, MethodCapabilities, MethodContext, check_target, register
from layerfold.models.facts import ModelFacts
from layerfold.scoring.similarity import block_angular_distance, window_cosine
from layerfold.surgery import LayerSurgeryError
from layerfold.surgery.fold import LinearFold

log = logging.getLogger(__name__)

SELECTIONS = ("angular", "cosine")
OBJECTIVES = ("lstsq", "cosine")


@dataclass
class ReplaceMeConfig:
    name: str = "replaceme"
    num_remove: int = field(default=8, metadata={"ge": 1, "lt": "num_layers"})  # n: layers in the removed block
    selection: str = field(default="angular", metadata={"choices": list(SELECTIONS)})
    start: Optional[int] = field(default=None, metadata={"ge": 1})  # fix the block's first layer (null: chosen by selection)
    objective: str = field(default="lstsq", metadata={"choices": list(OBJECTIVES)})
    ridge: float = field(default=0.0, metadata={"ge": 0.0})  # lstsq: (XᵀX + ridge I)^-1 XᵀY (the released code's alpha)
    solver: str = field(default="cholesky", metadata={"choices": ["cholesky", "inverse"]})  # inverse: the released code's explicit inverse
    product_dtype: str = field(default="float64", metadata={"choices": list(PRODUCT_DTYPES)})  # per-batch products; the sums are float64
    # cosine objective (the released code's defaults): Adam from the identity, shuffled token batches
    cosine_target: str = field(default="residual", metadata={"choices": ["residual", "output"]})
    init: str = field(default="identity", metadata={"choices": ["identity", "lstsq"]})
    epochs: int = field(default=10, metadata={"ge": 1})
    lr: float = field(default=1.0e-4, metadata={"gt": 0.0})
    batch_tokens: int = field(default=1024, metadata={"ge": 1})


def problems(cfg: ReplaceMeConfig, facts: ModelFacts, params: Any) -> list[str]:
    """A fixed block (``start``) must lie inside the model, before anything runs (compress checks again)."""
    if cfg.start is None:
        return []
    start, n = int(cfg.start), int(cfg.num_remove)
    if start + n > facts.num_layers:
        return [f"method.start={start} with method.num_remove={n} asks for layers {start}..{start + n - 1}, which a model of "
                f"{facts.num_layers} layers does not have: method.start must lie in 1..{facts.num_layers - n} "
                f"(`-S method.start=<1..{facts.num_layers - n}>`), or null to choose the block by distance."]
    return []


CAPABILITIES = MethodCapabilities(
    edit="replace",
    edit_note="folds a fitted map into the layer before the block",
    # selection=cosine reads the removed block's two ends, num_remove layers apart; angular reads the last token's angles
    reads=CaptureReads(("cosine", "last_token_angular"),
                       cosine_distance=lambda cfg: cfg.num_remove if cfg.selection == "cosine" else None),
)


@register("replaceme", ReplaceMeConfig, capabilities=CAPABILITIES, problems=problems)
def replaceme(ctx: MethodContext, cfg: ReplaceMeConfig) -> dict:
    check_target(ctx, cfg.num_remove)
    n, layers = cfg.num_remove, ctx.num_layers
    if layers - n < 1:
        raise LayerSurgeryError(f"method.num_remove={n} leaves no layer before the block to fold the map into; choose at most {layers - 1}.")
    distances = block_distances(ctx, cfg)
    start = choose_start(distances, n, layers, cfg.start)
    block = list(range(start, start + n))
    fold_layer = start - 1
    width = ctx.model.config.hidden_size
    fix = ("Raise data.calibration.num_blocks x seq_len (`-S data.calibration.num_blocks=...`) or set method.ridge > 0 "
           "(`-S method.ridge=1e-3`).")
    tokens = int(ctx.calibration.numel())
    if (cfg.objective == "lstsq" or cfg.init == "lstsq") and cfg.ridge <= 0 and tokens < width:
        # Before any forward: the system is singular whatever the activations.
        raise SingularSystemError(f"{tokens} calibration tokens cannot determine a {width} x {width} linear map "
                                  f"(X^T X has rank at most {tokens} < {width}). {fix}")
    fit = WindowFit(width, PRODUCT_DTYPES[cfg.product_dtype], keep_targets=cfg.objective == "cosine", target=cfg.cosine_target)
    stream_window(ctx, fold_layer, start + n, fit)
    details: dict = {}
    if cfg.objective == "lstsq":
        transform = fit.equations.solve(cfg.ridge, fix, inverse=cfg.solver == "inverse")
    else:
        initial = fit.equations.solve(cfg.ridge, fix, inverse=cfg.solver == "inverse") if cfg.init == "lstsq" else None
        transform, curve = cosine_fit(fit, initial, cfg, ctx.seed, ctx.device)
        details["cosine_loss"] = curve
    details.update(fit.residuals(transform))
    ctx.stand_in(fold_layer, block, LinearFold(ctx.adapter.mlp_output, transform, source=f"replaceme:{cfg.objective}"))
    return {
        "block_distance": [None if d is None else round(float(d), 6) for d in distances],  # index = the block's first layer
        "selection": cfg.selection if cfg.start is None else "fixed",
        "chosen_start": start,
        "removed_layers": block,
        "fold_layer": fold_layer,
        "fold_module": ctx.adapter.mlp_output,
        "objective": cfg.objective,
        "calibration_tokens": fit.equations.tokens,
        **details,
    }


# ---------------------------------------------------------------------------------------------------
# Selection
def block_distances(ctx: MethodContext, cfg: ReplaceMeConfig) -> list[float | None]:
    """Distance between the input and output of every block of ``n`` layers (index = first layer); None where it was not captured."""
    stats = ctx.dense_stats()
    n = cfg.num_remove
    if stats.num_boundaries != ctx.num_layers + 1:
        raise LayerSurgeryError(f"The statistics cover {stats.num_boundaries - 1} layers but the model has {ctx.num_layers}; "
                                "capture them from the model being compressed.")
    if cfg.start is not None and cfg.selection == "cosine" and torch.isnan(torch.diagonal(stats.cosine, offset=n)).any():
        return [None] * (ctx.num_layers - n + 1)  # fixed block: the distances are informative only
    if cfg.selection == "angular":
        values = block_angular_distance(stats.last_token_angular, n)
    else:
        values = 1.0 - window_cosine(stats.cosine, n)
    return [float(v) for v in values]


def choose_start(distances: list[float | None], n: int, layers: int, fixed: int | None) -> int:
    """The block's first layer: ``fixed`` when given (checked to fit), else the smallest distance over ``1 .. L - n``
    (ties to the earlier block, as the released code's stable sort)."""
    if fixed is not None:
        if not 1 <= fixed <= layers - n:
            raise LayerSurgeryError(
                f"method.start={fixed} with method.num_remove={n} asks for layers {fixed}..{fixed + n - 1}, which a model of {layers} layers "
                f"does not have with a layer before them to fold into: method.start must lie in 1..{layers - n}."
            )
        return fixed
    candidates = [(d, j) for j, d in enumerate(distances) if j >= 1 and d is not None]
    return min(candidates)[1]


# ---------------------------------------------------------------------------------------------------
# Streaming the window: the MLP output of the fold layer, its output, and the block's output
class WindowFit:
    """Per batch: ``M`` (fold layer's MLP output), ``Y`` (its output), ``L`` (the block's output) into the normal equations.

    ``M`` arrives during the fold layer, ``Y`` right after it, ``L`` ``n`` layers later: ``XᵀX`` and
    ``Xᵀ(M - Y)`` are added when ``Y`` arrives and ``XᵀL`` when ``L`` does, so only ``M`` waits (in the
    activations' placement). ``keep_targets`` also keeps every token's regressor and target for an
    iterative objective.
    """

    def __init__(self, width: int, product_dtype: torch.dtype, keep_targets: bool = False, target: str = "residual") -> None:
        self.equations = NormalEquations(width, product_dtype)
        self.keep_targets, self.target = keep_targets, target
        self.pending: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}  # (chunk, batch) -> (M, M - Y)
        self.inputs: list[torch.Tensor] = []  # M of every token (keep_targets)
        self.targets: list[torch.Tensor] = []  # L - Y + M, or L (target=output)
        self.offsets: list[torch.Tensor] = []  # Y - M (target=output)
        self.target_energy = 0.0  # sum ||target||^2, float64: the fit's relative residual
        self.cross_energy = torch.zeros((), dtype=torch.float64)  # sum <M, target>: the residual of T = I (plain removal)
        self.input_energy = 0.0

    def fold_output(self, key: tuple[int, int], mlp: torch.Tensor, output: torch.Tensor, store: Callable[[torch.Tensor], torch.Tensor]) -> None:
        difference = mlp - output  # -(the post-attention residual)
        self.equations.add(mlp)
        self.equations.add_cross(mlp, difference)
        self.pending[key] = (store(mlp), store(difference))

    def block_output(self, key: tuple[int, int], block: torch.Tensor) -> None:
        mlp, difference = self.pending.pop(key)
        mlp, difference = mlp.to(block.device), difference.to(block.device)
        self.equations.add_cross(mlp, block)
        target = (block.double() + difference.double())
        self.target_energy += float(target.square().sum())
        self.input_energy += float(mlp.double().square().sum())
        self.cross_energy += (mlp.double() * target).sum().cpu()
        if self.keep_targets:
            flat = lambda t: t.reshape(-1, t.shape[-1]).float().cpu()  # noqa: E731
            self.inputs.append(flat(mlp))
            if self.target == "residual":
                self.targets.append(flat(target))
            else:
                self.targets.append(flat(block))
                self.offsets.append(flat(-difference))

    @torch.no_grad()
    def residuals(self, transform: torch.Tensor) -> dict:
        """Relative residual ``||M T - target||^2 / ||target||^2`` of the fit and of ``T = I`` (plain removal), from the sums."""
        eq = self.equations
        t = transform.to(eq.xtx.device, torch.float64)
        fitted = float((t * (eq.xtx @ t)).sum() - 2 * (t * eq.xty).sum()) + self.target_energy
        plain = self.input_energy - 2 * float(self.cross_energy) + self.target_energy
        energy = max(self.target_energy, 1e-300)
        return {"relative_residual": round(fitted / energy, 6), "relative_residual_without_map": round(plain / energy, 6)}


@contextmanager
def tapped(template: nn.Module, module: str, hook: Callable) -> Iterator[None]:
    """A forward hook on sub-module ``module`` of a runner's layer template while layers run.

    The runner builds each layer as a deep copy of its template (:func:`~layerfold.execution.layer_major.materialise_layer`),
    and a deep copy keeps the module's hooks, so the hook fires in the layer that actually runs.
    """
    handle = template.get_submodule(module).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def stream_window(ctx: MethodContext, fold_layer: int, end: int, fit: WindowFit) -> None:
    """Run layers ``0 .. end - 1`` over the calibration blocks and hand the window's activations to ``fit``.

    Resident: ``capture.batch_size`` sequences at a time (memory independent of the calibration size);
    layer-major: all sequences boundary by boundary, each layer read once.
    """
    chunks = [ctx.calibration] if ctx.is_layer_major else list(ctx.calibration.split(ctx.batch_size))
    for chunk_id, blocks in enumerate(chunks):
        run, acts = ctx.layers_over(blocks)
        _stream_chunk(run, acts, chunk_id, fold_layer, end, fit, ctx.adapter.mlp_output)


def _stream_chunk(run: LayerMajorRunner, acts: Activations, chunk_id: int, fold_layer: int, end: int, fit: WindowFit, mlp_output: str) -> None:
    run.run_layers(acts, 0, fold_layer)
    latest: list[torch.Tensor] = []

    def keep_mlp(module, args, output) -> None:
        latest[:] = [output.detach()]

    def on_boundary(boundary: int, batch: int, hidden: torch.Tensor) -> None:
        if boundary == fold_layer + 1:
            fit.fold_output((chunk_id, batch), latest.pop(), hidden, acts.store)
        if boundary == end:
            fit.block_output((chunk_id, batch), hidden)

    with tapped(run.templates[fold_layer], mlp_output, keep_mlp):
        run.run_layers(acts, fold_layer, end, on_boundary=on_boundary)
    if fit.pending:
        raise RuntimeError(f"{len(fit.pending)} batches never reached boundary {end}; the runner skipped a layer.")


# ---------------------------------------------------------------------------------------------------
# The cosine objective
def cosine_fit(fit: WindowFit, initial: torch.Tensor | None, cfg: ReplaceMeConfig, seed: int, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """Adam on ``1 - mean_t cos(M_t T (+ offset_t), target_t)`` over shuffled token batches (seeded), from ``initial`` or the identity.

    Returns ``T`` (float64) and the mean loss of every epoch.
    """
    inputs = torch.cat(fit.inputs).to(device)
    targets = torch.cat(fit.targets).to(device)
    offsets = torch.cat(fit.offsets).to(device) if fit.offsets else None
    width = inputs.shape[1]
    start = torch.eye(width) if initial is None else initial.float().cpu()
    transform = nn.Parameter(start.to(device, torch.float32).clone())
    optimizer = torch.optim.Adam([transform], lr=cfg.lr)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            order = torch.randperm(inputs.shape[0], generator=generator).to(device)
            total, batches = 0.0, 0
            for rows in order.split(cfg.batch_tokens):
                mapped = inputs[rows] @ transform
                if offsets is not None:
                    mapped = mapped + offsets[rows]
                loss = 1.0 - torch.nn.functional.cosine_similarity(mapped, targets[rows], dim=1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, batches = total + float(loss.detach()), batches + 1
            curve.append(round(total / batches, 6))
    log.info("replaceme cosine fit: loss per epoch %s", curve)
    return transform.detach().double().cpu(), curve

