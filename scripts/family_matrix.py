"""The families x methods matrix: every method on a tiny random model of every family, through ``validate``.

    python scripts/family_matrix.py                       # run every cell, rewrite the table in docs/architectures.md
    python scripts/family_matrix.py --check               # run every cell, fail if the committed table differs
    python scripts/family_matrix.py --families gemma2 mixtral --print   # some rows, printed

A cell first goes through :func:`layerfold.validation.check` with the composed params of its column and
the facts of the family's config (what the ``validate`` stage does, no weights). A refusal there is the
cell's result ("no", with the message). Otherwise the column's work runs on the tiny model of
``layerfold.models.tiny`` through the compress stage's own function (the checkpoint saved, reloaded with
plain ``from_pretrained`` and generating greedily with the KV cache exactly as without it, in float64);
the recovery columns then train the ShortGPT result for two steps; the ``sequential`` column compresses
with ShortGPT and LaCo both resident and layer by layer and requires the same plan and identical
checkpoints. Anything that fails after ``validate`` accepted is a broken contract and stops the run.
"""

from __future__ import annotations

import argparse
import functools
import re
import time
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architectures.md"
BEGIN, END = "<!-- family-matrix:begin -->", "<!-- family-matrix:end -->"


@dataclass(frozen=True)
class Column:
    name: str  # header of the table
    overrides: tuple[str, ...]  # Hydra overrides of conf/ (after the shared ones)
    kind: str = "method"  # method | recovery | sequential


ONE = "method.num_remove=1"  # 4 layers -> 3
COLUMNS = (
    Column("ShortGPT", ("method=shortgpt", ONE)),
    Column("Gromov", ("method=gromov", ONE)),
    Column("SLEB", ("method=sleb", ONE)),
    Column("drop-last", ("method=drop_last", ONE)),
    Column("LaCo", ("method=laco", "method.merge_layers=2", "method.threshold=-1.0", "method.interval=1", "method.target_layers=3")),
    Column("MKA", ("method=mka", ONE, "method.k_entropy=3", "method.n_neighbors=3")),
    Column("CoMe", ("method=come", ONE)),
    Column("CoMe-P", ("method=come_p", ONE, "method.granularity=2")),
    Column("Streamline layer", ("method=streamline", ONE, "method.replacement=transformer_layer")),
    Column("Streamline ffn", ("method=streamline", ONE, "method.replacement=ffn")),
    Column("Streamline swiglu", ("method=streamline", ONE, "method.replacement=swiglu")),
    Column("Streamline mlp", ("method=streamline", ONE, "method.replacement=mlp", "method.mlp_ratio=2")),
    Column("Streamline none", ("method=streamline", ONE, "method.replacement=none")),
    Column("distill", ("method=shortgpt", ONE, "recovery=distill"), "recovery"),
    Column("LoRA", ("method=shortgpt", ONE, "recovery=lora"), "recovery"),
    Column("sequential", ("method=shortgpt", ONE, "hardware=sequential"), "sequential"),
)
# The layer-by-layer column's methods: a removal and a merge (the plan applied lazily per layer).
SEQUENTIAL_METHODS = ({"name": "shortgpt", "num_remove": 1},
                      {"name": "laco", "merge_layers": 2, "threshold": -1.0, "interval": 1, "target_layers": 3})


class ContractBroken(AssertionError):
    """A cell that validate accepted failed: the table cannot be written."""


@dataclass(frozen=True)
class Cell:
    runs: bool
    reason: str = ""  # the refusal, when it does not run, with the family's name written {family}

    def text(self) -> str:
        return "yes" if self.runs else "no"


@functools.lru_cache(maxsize=None)
def composed(column: Column):
    from layerfold.config import compose

    return OmegaConf.create(compose(REPO / "conf", list(column.overrides)))


def _blocks(n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(4, 99, (n, seq), generator=torch.Generator().manual_seed(seed))


def _refusal(column: Column, family: str) -> str | None:
    """What ``validate`` says about this cell (from the family's config only), or None when it accepts."""
    from layerfold.config import ConfigError
    from layerfold.models.adapters import UnsupportedArchitectureError
    from layerfold.models.facts import facts_from_config
    from layerfold.models.tiny import tiny_config
    from layerfold.validation import check

    params = composed(column)  # a composition error is the table's own mistake, not a refusal
    where = f"{family} x {column.name}"
    try:
        check(params, facts_from_config(tiny_config(family)), where=where)
    except (ConfigError, UnsupportedArchitectureError) as err:
        return generic_reason(family, " ".join(str(err).removeprefix(f"{where}: ").split()))
    return None


def generic_reason(family: str, reason: str) -> str:
    """A refusal with the family's own name replaced, so that one reason shared by several families is listed once."""
    reason = reason.replace(f" [model family: {family}]", "")
    return re.sub(rf"(?<![\w.]){re.escape(family)}(?![\w])", "{family}", reason)


def _dense_checkpoint(family: str, folder: Path) -> Path:
    from layerfold.models import save_checkpoint
    from layerfold.models.tiny import tiny_model, tiny_tokenizer

    path = folder / f"{family}-dense"
    if not path.exists():
        save_checkpoint(tiny_model(family), tiny_tokenizer(), path, dtype=torch.float32)
    return path


def _generates_like_itself(family: str, path: Path) -> None:
    """The saved checkpoint loads with plain from_pretrained (plus a replacement side file) and greedy generation
    with the KV cache equals generation without it (float64, eager paths)."""
    from transformers import AutoModelForCausalLM

    from layerfold.models.replacement import attach_side_layers
    from layerfold.models.tiny import eager

    model = attach_side_layers(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, **eager(family)), path).eval()
    ids = _blocks(1, 6, seed=7)
    with torch.no_grad():
        runs = [model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=cache, pad_token_id=0)
                for cache in (True, False)]
    if runs[0].shape != (1, 11) or not torch.equal(*runs):
        raise ContractBroken(f"{family}: {path.name} generates differently with and without the KV cache: {runs[0].tolist()} vs {runs[1].tolist()}")


def _compress(family: str, base: Path, method, out: Path) -> dict:
    from layerfold.compression import compress_resident

    plan, _, _ = compress_resident(base, _blocks(8, 12, seed=1), None, method, 4, torch.device("cpu"), torch.float32, torch.float32, out)
    return plan


def _recover(family: str, base: Path, compressed: Path, plan: dict, recovery, out: Path) -> None:
    from layerfold.models import load_checkpoint, save_checkpoint
    from layerfold.recovery import RecoveryEngine

    cfg = OmegaConf.merge(recovery, {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "log_every": 1})
    student, tokenizer = load_checkpoint(compressed, "cpu", torch.float32)
    teacher, _ = load_checkpoint(base, "cpu", torch.float32)
    model, summary = RecoveryEngine(student, teacher, plan, cfg, _blocks(8, 12, seed=2), _blocks(4, 12, seed=3), progress=False).run()
    losses = [p for phase in summary["phases"] for p in (phase.get("val_before"), phase.get("val_after")) if p is not None]
    if not losses or not all(torch.isfinite(torch.tensor(losses))):
        raise ContractBroken(f"{family}: recovery={cfg.name} gave losses {losses}")
    save_checkpoint(model, tokenizer, out, dtype=torch.float32)


def _sequential(family: str, base: Path, hardware, work: Path) -> None:
    """ShortGPT and a LaCo merge, resident and layer by layer: the same plan and the same checkpoint tensors."""
    from safetensors.torch import load_file

    from layerfold.compression import compress_layer_major, compress_resident

    blocks = _blocks(8, 12, seed=1)
    for method in SEQUENTIAL_METHODS:
        name = method["name"]
        args = (blocks, None, method)
        resident, _, _ = compress_resident(base, *args, 4, torch.device("cpu"), torch.float32, torch.float32, work / f"{name}-resident")
        layered, _, _ = compress_layer_major(base, *args, hardware, 4, torch.device("cpu"), torch.float32, torch.float32, work / f"{name}-sequential")
        same = {k: v for k, v in resident.items() if k != "details"} == {k: v for k, v in layered.items() if k != "details"}
        theirs, ours = (load_file(work / f"{name}-{mode}" / "model.safetensors") for mode in ("resident", "sequential"))
        if not same or sorted(theirs) != sorted(ours) or not all(torch.equal(theirs[k], ours[k]) for k in theirs):
            raise ContractBroken(f"{family}: {name} layer by layer differs from resident (plans equal: {same}).")
        _generates_like_itself(family, work / f"{name}-sequential")


def run_cell(family: str, column: Column, work: Path) -> Cell:
    """One cell: refused by validate (with its message), or run and checked."""
    why = _refusal(column, family)
    if why is not None:
        return Cell(False, why)
    params = composed(column)
    base = _dense_checkpoint(family, work)
    out = work / f"{family}-{re.sub(r'[^a-z0-9]+', '-', column.name.lower())}"
    try:
        if column.kind == "sequential":
            _sequential(family, base, params.hardware, out)
            return Cell(True)
        plan = _compress(family, base, params.method, out / "compressed")
        target = out / "compressed"
        if column.kind == "recovery":
            _recover(family, base, target, plan, params.recovery, out / "recovered")
            target = out / "recovered"
        _generates_like_itself(family, target)
    except ContractBroken:
        raise
    except Exception as err:  # noqa: BLE001 - any failure after validate accepted breaks the contract
        raise ContractBroken(f"{family} x {column.name}: validate accepted, then {type(err).__name__}: {err}") from err
    return Cell(True)


def run_row(family: str, work: Path | None = None) -> dict[str, Cell]:
    """Every column for one family (a temporary folder for the checkpoints unless ``work`` is given)."""
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)  # tiny models: threads only spin
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        folder = Path(work or tmp)
        cells = {}
        for column in COLUMNS:
            began = time.process_time()
            cells[column.name] = run_cell(family, column, folder)
            TIMES[(family, column.name)] = time.process_time() - began
        return cells


TIMES: dict[tuple[str, str], float] = {}  # CPU seconds per cell (process time), for keeping the matrix fast


# ---------------------------------------------------------------------------------------------------
# The table in docs/architectures.md
def render(rows: dict[str, dict[str, Cell]]) -> str:
    """The markdown table (families x columns) and its numbered refusal reasons, between the markers."""
    reasons: list[str] = []
    lines = ["| family | " + " | ".join(c.name for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for family, cells in rows.items():
        texts = []
        for column in COLUMNS:
            cell = cells[column.name]
            if not cell.runs:
                if cell.reason not in reasons:
                    reasons.append(cell.reason)
                texts.append(f"no [{reasons.index(cell.reason) + 1}]")
            else:
                texts.append("yes")
        lines.append(f"| `{family}` | " + " | ".join(texts) + " |")
    notes = [f"{i}. {reason.replace('|', '/')}" for i, reason in enumerate(reasons, 1)]
    return "\n".join([BEGIN, "", *lines, "", "Refusals (raised by `validate`, from the config alone):", "", *notes, "", END])


def parse(text: str) -> dict[str, dict[str, Cell]]:
    """The rows of a table written by :func:`render`."""
    block = text[text.index(BEGIN) : text.index(END)]
    reasons = {int(m.group(1)): m.group(2) for m in re.finditer(r"^(\d+)\. (.*)$", block, re.M)}
    rows = {}
    for line in block.splitlines():
        match = re.match(r"^\| `([^`]+)` \| (.*) \|$", line)
        if match:
            cells = [c.strip() for c in match.group(2).split(" | ")]
            rows[match.group(1)] = {
                column.name: Cell(True) if cell == "yes" else Cell(False, reasons[int(cell[4:-1])])
                for column, cell in zip(COLUMNS, cells)
            }
    return rows


def comparable(cell: Cell) -> Cell:
    """A cell as the table keeps it ('|' cannot stand in a table's notes)."""
    return Cell(cell.runs, cell.reason.replace("|", "/"))


def main() -> int:
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    from layerfold.models.tiny import TINY_FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(TINY_FAMILIES))
    parser.add_argument("--check", action="store_true", help="compare with the committed table instead of writing it")
    parser.add_argument("--print", action="store_true", help="print the table instead of writing it")
    args = parser.parse_args()
    rows = {}
    for family in args.families:
        rows[family] = run_row(family)
        print(f"{family}: " + ", ".join(f"{k}={v.text()}" for k, v in rows[family].items()), file=sys.stderr)
    table = render(rows)
    if args.print:
        print(table)
        return 0
    text = DOC.read_text()
    if not args.check and set(rows) != set(TINY_FAMILIES):  # some rows: update them in the committed table
        rows = {f: rows[f] if f in rows else cells for f, cells in parse(text).items()}
        table = render(rows)
    if args.check:
        committed = parse(text)
        stale = [f for f in rows if {k: comparable(v) for k, v in rows[f].items()} != committed.get(f)]
        if stale:
            print(f"docs/architectures.md is stale for {stale}; run scripts/family_matrix.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text[: text.index(BEGIN)] + table + text[text.index(END) + len(END) :])
    return 0


if __name__ == "__main__":
    sys.exit(main())
