"""Run the committed notebooks in place, so they are committed with their outputs.

    python notebooks/execute.py                       # both notebooks, from the repository root
    python notebooks/execute.py reproduction.ipynb    # one

``reproduction.ipynb`` reads the committed H100 comparison (``results/comparison/smollm2-135m-q4_1_h100``),
so its outputs are the same on every machine; ``compare_experiments.ipynb`` reads the DVC experiments of
this workspace (or, with none, the workspace's own run). Volatile metadata (execution timestamps) is
dropped, so running again on the same inputs rewrites the same file; ``tests/report`` checks the
committed outputs are what the code gives now.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("reproduction.ipynb", "compare_experiments.ipynb")


def execute(path: Path, cwd: Path) -> nbformat.NotebookNode:
    """``path`` run top to bottom with ``cwd`` as its working directory; its outputs in the returned notebook."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # start and end times: a rerun would rewrite them
        if cell.cell_type == "code":  # the results, not the kernel's warnings (they name this machine's paths)
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    notebook.metadata.pop("widgets", None)
    return notebook


def main(names: list[str]) -> None:
    for name in names or NOTEBOOKS:
        path = HERE / name
        notebook = execute(path, HERE.parent)
        errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        if errors:
            sys.exit(f"{name}: a cell failed: {errors[0].ename}: {errors[0].evalue}")
        tmp = path.with_suffix(".ipynb.tmp")
        nbformat.write(notebook, tmp)
        tmp.replace(path)
        print(f"{path.relative_to(HERE.parent)}: {sum(c.cell_type == 'code' for c in notebook.cells)} code cells run")


if __name__ == "__main__":
    main(sys.argv[1:])
