"""The last screen of a run: a few lines (at most 100 columns) the report stage prints when it is done.

Everything comes from ``metrics/summary.json`` (:func:`layerfold.report.protocol.summary`), plus the
model's name and the dense depth and perplexity, which the summary does not hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

WIDTH = 100


def _cut(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _num(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def last_screen(summary: Mapping[str, Any], model: str | None = None, method: str | None = None, dense_layers: int | None = None,
                dense_ppl: float | None = None, report: str = "reports/report.md", summary_path: str = "metrics/summary.json",
                width: int = WIDTH) -> list[str]:
    """The run in at most eight lines of at most ``width`` characters: model, method, layers and size; the
    headline ± se over the informative tasks and Δ ± se vs dense with its verdict and retained %;
    perplexities; collapse and answer drift when there are any; where the report and summary are.
    Accuracies in % and differences in points, as ``summary`` holds them."""
    layers = _num(summary.get("layers"), "d")
    depth = f"{dense_layers} → {layers} layers" if dense_layers is not None else f"{layers} layers"
    size = f" ({summary['params_m']:.1f} M parameters)" if summary.get("params_m") is not None else ""
    trained = f", recovered on {summary['train_tokens']:,} tokens" if summary.get("train_tokens") else ""
    lines = [f"{model or 'model'} · {method or 'method'} · {depth}{size}{trained}"]
    verdict = summary.get("verdict") or "no standard error"
    retained = ""
    if summary.get("retained") is not None:
        interval = (f" [{summary['retained_lo']:.1f}, {summary['retained_hi']:.1f}]"
                    if summary.get("retained_lo") is not None and summary.get("retained_hi") is not None else "")
        retained = f"; retained {summary['retained']:.1f} %{interval}"
    lines.append(f"headline    {_num(summary.get('headline'), '.2f')} ± {_num(summary.get('se'), '.2f')} % "
                 f"(dense {_num(summary.get('dense'), '.2f')} %)")
    lines.append(f"vs dense    Δ {_num(summary.get('delta'), '+.2f')} ± {_num(summary.get('delta_se'), '.2f')} points, {verdict}{retained}")
    tasks = ", ".join(summary.get("tasks") or []) or "none"
    lines.append(f"tasks       {summary.get('n_tasks', 0)} informative ({summary.get('rule') or '—'} rule): {tasks}")
    ppl = f"perplexity  WikiText-2 {_num(summary.get('wiki2_ppl'), '.2f')}"
    if dense_ppl is not None:
        ppl += f" (dense {dense_ppl:.2f})"
    ppl += f" · C4 {_num(summary.get('c4_ppl'), '.2f')}"
    if summary.get("lambada_ppl") is not None:
        ppl += f" · LAMBADA targets {summary['lambada_ppl']:.2f}"
    lines.append(ppl)
    flags = [*(["collapsed (perplexity far above dense)"] if summary.get("collapsed") else []),
             *([f"answer drift {summary['drift']}"] if summary.get("drift") else [])]
    if flags:
        lines.append("warning     " + "; ".join(flags))
    lines.append(f"report      {report} (summary {summary_path}; dvc exp show for every run)")
    return [_cut(line, width) for line in lines]
