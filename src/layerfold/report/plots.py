"""Report figures. Each function returns the matplotlib Figure and, given ``path``, also writes it as
PNG atomically. Figures are built on the Agg canvas directly (no pyplot state, no GUI backend), so
they work in a stage, in tests and inline in a notebook (``display(fig)``).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from layerfold.io import atomic_file

COLORS = {"kept": "#4c72b0", "removed": "#c44e52", "merged": "#dd8452", "dense": "#222222", "compressed": "#4c72b0"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> None:
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)


def _ticks(n: int, most: int = 32) -> list[int]:
    step = max(1, -(-n // most))
    return list(range(0, n, step))


def similarity_heatmap(cosine: list[list[float]], path: str | Path | None = None, title: str | None = None) -> Figure:
    """Mean token cosine between layer boundaries (``stats.json['cosine']``, ``[L + 1, L + 1]``)."""
    n = len(cosine)
    fig = _figure(7.0, 6.0)
    ax = fig.add_subplot()
    image = ax.imshow(cosine, cmap="viridis", origin="upper", interpolation="nearest")
    ticks = _ticks(n)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("boundary j (0 = embeddings, j = output of layer j−1)")
    ax.set_ylabel("boundary i")
    ax.set_title(title or f"Mean token cosine between layer boundaries ({n - 1} layers)")
    fig.colorbar(image, ax=ax, label="mean cosine similarity")
    if path is not None:
        save_png(fig, path)
    return fig


def layer_importance(
    block_influence: list[float],
    removed: list[int],
    path: str | Path | None = None,
    merged: list[list[int]] | None = None,
    title: str | None = None,
) -> Figure:
    """Block influence (1 − cos between a layer's input and output) per original layer.

    ``removed`` layers are red, layers of ``merged`` groups orange. A log scale is used when the
    values span more than 20x and are all positive (layer 0 often dwarfs the rest).
    """
    n = len(block_influence)
    removed_set = set(removed)
    merged_set = {layer for group in merged or [] for layer in group}
    status = ["removed" if i in removed_set else "merged" if i in merged_set else "kept" for i in range(n)]
    fig = _figure(max(6.0, 0.25 * n + 2.0), 4.0)
    ax = fig.add_subplot()
    ax.bar(range(n), block_influence, color=[COLORS[s] for s in status], edgecolor="none")
    positive = [v for v in block_influence if v > 0]
    if len(positive) == n and n and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_xticks(_ticks(n, 64))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("original layer")
    ax.set_ylabel("block influence (1 − cos)")
    ax.set_title(title or "Layer importance on the calibration set")
    counts = {s: status.count(s) for s in ("kept", "removed", "merged")}
    handles = [Patch(color=COLORS[s], label=f"{s} ({counts[s]})") for s in ("kept", "removed", "merged") if counts[s]]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    if path is not None:
        save_png(fig, path)
    return fig


def accuracy_vs_params(points: list[dict], path: str | Path | None = None, title: str | None = None) -> Figure:
    """Average accuracy against parameter count, one labelled point per model, with ±1.96 standard
    error bars.

    ``points``: ``{name, params, average_acc, se?, dense?, significant?}`` (see
    :func:`layerfold.report.tables.accuracy_points`); points without both numbers are left out (and
    said so in the figure). Dense models are black stars. A compressed model whose difference from
    its dense model is inside the noise (``significant`` False) is drawn hollow and labelled "n.s.",
    so a point above the dense star never reads as a gain unless it is one.
    """
    fig = _figure(7.0, 4.8)
    ax = fig.add_subplot()
    usable = [p for p in points if p.get("params") is not None and p.get("average_acc") is not None]
    for p in usable:
        if p.get("se") is not None:
            ax.errorbar(p["params"] / 1e6, 100 * p["average_acc"], yerr=196 * p["se"], fmt="none", ecolor="#999999",
                        elinewidth=1, capsize=3, zorder=2)
    groups = [
        ("dense", lambda p: bool(p.get("dense")), {"marker": "*", "s": 160, "color": COLORS["dense"]}),
        ("compressed", lambda p: not p.get("dense") and p.get("significant") is not False,
         {"marker": "o", "s": 50, "color": COLORS["compressed"]}),
        ("compressed, within noise of dense", lambda p: not p.get("dense") and p.get("significant") is False,
         {"marker": "o", "s": 50, "facecolors": "none", "edgecolors": COLORS["compressed"]}),
    ]
    for label, member, style in groups:
        group = [p for p in usable if member(p)]
        if group:
            ax.scatter([p["params"] / 1e6 for p in group], [100 * p["average_acc"] for p in group], zorder=3, label=label, **style)
    for p in usable:
        label = p["name"] + (" (n.s.)" if p.get("significant") is False else "")
        ax.annotate(label, (p["params"] / 1e6, 100 * p["average_acc"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if usable:
        ax.legend(loc="lower right", fontsize=8)
        ax.margins(x=0.15, y=0.15)
    skipped = len(points) - len(usable)
    if not usable or skipped:
        message = "no lm-eval accuracies to plot" if not usable else f"{skipped} model(s) without accuracy not shown"
        ax.text(0.02, 0.98, message, transform=ax.transAxes, va="top", fontsize=8, color="#666666")
    ax.grid(alpha=0.3)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("average accuracy (%), bars: ±1.96 standard errors")
    ax.set_title(title or "Accuracy vs size")
    if path is not None:
        save_png(fig, path)
    return fig


def perplexity_bars(perplexities: dict[str, dict[str, float]], path: str | Path | None = None, title: str | None = None) -> Figure:
    """Perplexity per dataset (groups) and model (bars): ``{"dense": {"wikitext2": 23.1, "c4": ...}, "compressed": {...}}``.

    A log scale when the values span more than 10x (a pruned model's perplexity is often many times the
    dense one's); each bar is labelled with its value.
    """
    models = [m for m in perplexities if perplexities[m]]
    datasets = sorted({d for m in models for d in perplexities[m]})
    fig = _figure(max(5.0, 1.6 * len(datasets) + 2.5), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / max(len(models), 1)
    palette = {"dense": COLORS["dense"], "compressed": COLORS["compressed"], "recovered": "#55a868"}
    for k, model in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(datasets))]
        values = [perplexities[model].get(d, float("nan")) for d in datasets]
        bars = ax.bar(xs, values, width=width * 0.95, label=model, color=palette.get(model))
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=2)
    values = [v for m in models for v in perplexities[m].values() if v > 0]
    if values and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title or "Perplexity")
    ax.margins(y=0.15)
    if models:
        ax.legend(fontsize=8)
    if path is not None:
        save_png(fig, path)
    return fig


def loss_curve(rows: list[dict], path: str | Path | None = None, title: str | None = None) -> Figure:
    """Recovery training loss per optimiser step (``metrics/recover_curve.csv`` rows: step, phase, loss), one line per phase.

    With no rows (``recovery=none``) the figure says so, so the plot is never missing from a run.
    """
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    phases: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        phases.setdefault(str(row["phase"]), []).append((float(row["step"]), float(row["loss"])))
    for phase, points in phases.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=phase, marker="." if len(points) < 30 else None)
    if phases:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no recovery training in this run (recovery=none)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.set_title(title or "Recovery loss")
    if path is not None:
        save_png(fig, path)
    return fig
