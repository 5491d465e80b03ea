"""Convert the local benchmark files into the row schema of lm-eval's stock tasks.

The offline data directory (``data.local_dir`` / ``$LAYERFOLD_DATA_DIR``) holds public copies of the
benchmark sets, but in whatever format their publisher used: original PIQA/WinoGrande JSONL, the
llama.cpp text dump of HellaSwag, MosaicML ``{query, choices, gold}`` JSONL for ARC/BoolQ/OpenBookQA,
and the original header-less MMLU CSVs. lm-eval's stock task configs expect the Hugging Face hub
schema of each set. :func:`prepare_benchmarks` rewrites every raw file once into JSONL with exactly
the fields the stock ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` / ``process_docs`` read,
so the local task configs (see :mod:`layerfold.evaluation.task_configs`) can reuse the stock prompts,
choices and metrics unchanged.

Layout of ``out_dir`` (split names are the stock task's split names)::

    manifest.json                       per-task metadata (rows, source sha256, data_files)
    piqa/validation.jsonl               goal, sol1, sol2, label:int
    winogrande/validation.jsonl         sentence, option1, option2, answer:"1"|"2"
    hellaswag/validation.jsonl          activity_label, ctx_a, ctx_b, ctx, endings, label:str, split
    arc_easy/test.jsonl                 id, question, choices{text,label}, answerKey
    arc_challenge/test.jsonl            (same)
    boolq/validation.jsonl              question, passage, idx, label:int
    openbookqa/test.jsonl               id, question_stem, choices{text,label}, answerKey
    mmlu/{test,dev}/<subject>.jsonl     question, subject, choices:list[str], answer:int
    lambada_openai/test.jsonl           text

What cannot be recovered from the local files (documented per converter below):

* HellaSwag: ``ind``, ``source_id``, ``split_type``, the exact ``ctx_a``/``ctx_b`` boundary, and which
  WikiHow endings began with a ``[title]``/``[step]``/``[substeps]`` tag (stock keeps a leading space
  there); see :func:`_convert_hellaswag`.
* ARC / OpenBookQA: the original ``id`` and answer-label alphabet (``"1".."4"`` on a few ARC rows);
  neither reaches the prompt, so ids are synthesised and labels are ``A, B, C, ...``.
* BoolQ: the ``"<Wikipedia title> -- "`` prefix SuperGLUE puts in front of every passage (MosaicML
  dropped it), so every BoolQ prompt differs from stock by that prefix. The local task is therefore
  named ``boolq_notitle`` ("BoolQ (no title)"), never ``boolq``; see :func:`_convert_boolq`.
"""

from __future__ import annotations

import bz2
import csv
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfold.data.text import DATA_FIX
from layerfold.io import atomic_file, file_sha256, read_json, read_jsonl, write_json

ENV_VAR = "LAYERFOLD_DATA_DIR"
MANIFEST = "manifest.json"
# Bump when any converter's output changes, so stale prepared files are rebuilt.
CONVERTER_VERSION = 2

# Documents whose stock render the local files cannot reproduce (counted on the public files listed in
# the README; tests/evaluation/test_task_fidelity.py re-counts them). HellaSwag: WikiHow documents,
# whose endings may have started with a tag the dump removed together with the space stock keeps.
# BoolQ: every document, for the missing "<title> -- " passage prefix.
HELLASWAG_WIKIHOW_DOCS = 6799
BOOLQ_NOTITLE_DOCS = 3270
LAMBADA_OPENAI_DOCS = 5153  # the test split of EleutherAI/lambada_openai (OpenAI's detokenised LAMBADA)

# The 57 MMLU subjects, in the order of lm-eval's mmlu/_generate_configs.py.
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)

Row = dict[str, Any]


@dataclass(frozen=True)
class _Spec:
    """How one stock task is built from raw files."""

    sources: tuple[str, ...]  # raw files relative to data_dir (their sha256 goes into the manifest)
    convert: Callable[[Path], dict[str, list[Row]]]  # data_dir -> {output relpath: rows}
    eval_split: str  # stock split that lm-eval scores


# ----------------------------------------------------------------------------- helpers



def _read_jsonl(path: Path) -> list[Row]:
    """A source file's rows; a damaged line is named with its file, line number and the fix."""
    return read_jsonl(path, fix=DATA_FIX)


def _write_jsonl(path: Path, rows: Iterable[Row]) -> int:
    """Write rows atomically (temp file + rename) so a killed run never leaves a half file."""
    count = 0
    with atomic_file(path, "w") as handle:
        for row in rows:
            # ensure_ascii=False keeps the text byte-identical to the source when read back.
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _check_count(name: str, rows: list, expected: int) -> None:
    if len(rows) != expected:
        raise ValueError(f"{name}: expected {expected} rows, found {len(rows)}; is the source file complete?")


# ----------------------------------------------------------------------------- converters


def _convert_piqa(data_dir: Path) -> dict[str, list[Row]]:
    """PIQA validation (original ybisk files) -> baber/piqa schema ``goal, sol1, sol2, label:int``.

    Texts are kept verbatim, trailing spaces included, as the hub copy keeps them.
    """
    rows = _read_jsonl(data_dir / "piqa" / "valid.jsonl")
    labels = (data_dir / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").split()
    _check_count("piqa labels", labels, len(rows))
    out = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)} for r, lab in zip(rows, labels)]
    return {"piqa/validation.jsonl": out}


def _convert_winogrande(data_dir: Path) -> dict[str, list[Row]]:
    """WinoGrande 1.1 dev (= hub ``winogrande_xl`` validation) -> ``sentence, option1, option2, answer``.

    ``answer`` stays the string ``"1"``/``"2"``: the stock ``preprocess_winogrande`` indexes a dict with it.
    """
    rows = _read_jsonl(data_dir / "winogrande" / "dev.jsonl")
    out = [{k: r[k] for k in ("sentence", "option1", "option2")} | {"answer": str(r["answer"])} for r in rows]
    return {"winogrande/validation.jsonl": out}


# A sentence end followed by whitespace; the text after the last one is the ActivityNet fragment.
_SENTENCE_END = re.compile(r"[.?!][\"')\]]*\s+")
_ENDS_SENTENCE = re.compile(r"[.?!][\"')\]]*$")


def _split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """Recover ``(ctx_a, ctx_b)`` from the joined ``ctx`` of the llama.cpp dump.

    The stock ``process_docs`` renders ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``,
    so the split point matters: ``ctx_b`` is upper-cased at its first letter (and lower-cased after).

    HellaSwag puts the incomplete noun phrase that starts the last sentence of an ActivityNet context
    into ``ctx_b`` (``"... roof. he"``) and leaves ``ctx_b`` empty for WikiHow, whose contexts end with
    a complete sentence. So: a context ending in ``.?!`` (closing quotes/brackets allowed) has an empty
    ``ctx_b``; otherwise ``ctx_b`` is the text after the last sentence end. This holds for every row
    of the validation file; an earlier rule that sent every context starting with ``How to`` to
    WikiHow misfiled one ActivityNet row ("Cleaning windows: How to clean your rv windows ... spray. you").

    Heuristic limit: a ``ctx_b`` that itself contains a sentence end (``"mr. smith"``) would be cut
    too short. None of the 3,243 ActivityNet fragments of the validation file has a capital letter,
    so ``capitalize`` only raises the first one, as on the hub rows.
    """
    if _ENDS_SENTENCE.search(ctx):
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return ctx, ""
    cut = ends[-1]
    return ctx[: cut.end()].rstrip(), ctx[cut.end():]


# A run of spaces; see _survive_collapse.
_SPACES = re.compile(r" {2,}")


def _survive_collapse(text: str) -> str:
    """``text`` padded so that lm-eval's ``preprocess`` gives ``text`` back unchanged.

    ``preprocess`` ends with one non-overlapping ``"  " -> " "`` pass, which maps a run of ``r``
    spaces to ``ceil(r / 2)``. The dump was already collapsed once, so a double space left in it
    (one ending of the validation file has one) is also in the stock render but would be collapsed
    a second time at evaluation. A run of ``m`` spaces stored as ``2m - 1`` comes back as ``m``.
    """
    return _SPACES.sub(lambda run: " " * (2 * len(run.group(0)) - 1), text)


def _convert_hellaswag(data_dir: Path) -> dict[str, list[Row]]:
    """HellaSwag validation from klosax/hellaswag_text_data -> Rowan/hellaswag fields.

    Source format (6 lines per item): ``activity_label + ": " + ctx``, gold index, 4 endings, each text
    passed through the dump's ``preprocess_data`` (``extract_hellaswag.cpp``): delete ``[header]``,
    ``[step]``, ``[substeps]``; ``" [title]"`` -> ``". "``; delete ``"[title] "`` and ``"[title]."``;
    one ``"  " -> " "`` pass; then drop **one leading space**. lm-eval's stock
    ``hellaswag.utils.preprocess`` (applied by the stock ``process_docs``, again at eval time on these
    rows) strips first, turns ``" [title]"`` into ``". "``, deletes every ``[...]`` span and collapses
    once -- but never strips again. The stored rows are chosen so that stock ``process_docs`` renders
    them exactly as it renders the hub rows, except where the dump lost the information:

    * **Endings that began with a tag (not recoverable).** A WikiHow ending such as
      ``"[title] Apply a pre-wash treatment. [step] ..."`` renders in stock with a leading space
      (``" Apply a ..."``, so the scored continuation starts with two spaces); the dump removed tag and
      space alike, and nothing in its text says which endings had a tag. Those endings are stored
      without the space. Every WikiHow document (empty ``ctx_b``; :data:`HELLASWAG_WIKIHOW_DOCS` of
      them) may therefore render differently from stock; the 3,243 ActivityNet documents carry no
      tags and render exactly.
    * **Double spaces** the dump kept would be collapsed a second time at eval; they are padded by
      :func:`_survive_collapse` so the render keeps them (one ending of the file).
    * ``ctx_a``/``ctx_b``: the dump stores only ``ctx`` (= ``ctx_a + " " + ctx_b``, ``ctx_b`` still
      lower-case) and stock capitalises ``ctx_b``; see :func:`_split_hellaswag_ctx`. ``ctx`` is stored
      exactly as in the dump.
    * Other ``[...]`` spans (38 documents, e.g. ``[www.kiddio.org]``) are in the dump and are deleted
      by stock at eval, as from the original; only spacing around a tag next to such a span could differ.
    * ``activity_label``: the text before the first ``": "``. Were a label to contain ``": "`` the
      rendered prompt is unchanged (it joins the two with ``": "`` again).
    * ``label``: stored as a string, as on the hub (stock casts it with ``int``).
    * ``ind``, ``source_id``, ``split_type``: not in the dump; omitted (stock does not read them).
      ``split`` is ``"val"`` as for every hub validation row.
    """
    path = data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="\n") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (label+ctx, gold, 4 endings).")
    out = []
    for i in range(0, len(lines), 6):
        head, gold, endings = lines[i], lines[i + 1], lines[i + 2 : i + 6]
        label, sep, ctx = head.partition(": ")
        if not sep or not gold.strip().isdigit():
            raise ValueError(f"{path}: item at line {i + 1} is malformed: {head[:80]!r} / {gold!r}")
        ctx_a, ctx_b = _split_hellaswag_ctx(ctx)
        out.append(
            {
                "activity_label": _survive_collapse(label),
                "ctx_a": _survive_collapse(ctx_a),
                "ctx_b": _survive_collapse(ctx_b),
                "ctx": ctx,
                "endings": [_survive_collapse(e) for e in endings],
                "label": str(int(gold)),
                "split": "val",
            }
        )
    return {"hellaswag/validation.jsonl": out}


def _mosaic_choices(row: Row) -> tuple[dict[str, list[str]], str]:
    labels = _letters(len(row["choices"]))
    return {"text": list(row["choices"]), "label": labels}, labels[int(row["gold"])]


def _convert_arc(name: str) -> Callable[[Path], dict[str, list[Row]]]:
    def convert(data_dir: Path) -> dict[str, list[Row]]:
        """ARC test in MosaicML format -> allenai/ai2_arc schema ``id, question, choices, answerKey``.

        ``question`` is the MosaicML ``query`` minus its ``"Question: "`` prefix (stock adds it back).
        ``id`` is synthesised (``<task>/test/<row>``) and answer labels are ``A..``: neither reaches the
        prompt, and ``answerKey`` is chosen so that ``choices.label.index(answerKey) == gold``.
        """
        out = []
        for i, row in enumerate(_read_jsonl(data_dir / name / f"{name}.jsonl")):
            query = row["query"]
            if not query.startswith("Question: "):
                raise ValueError(f"{name} row {i}: query does not start with 'Question: ': {query[:60]!r}")
            choices, key = _mosaic_choices(row)
            out.append({"id": f"{name}/test/{i}", "question": query[len("Question: "):], "choices": choices, "answerKey": key})
        return {f"{name}/test.jsonl": out}

    return convert


# MosaicML replaced every " question" inside BoolQ passages with "\nQuestion" (22 passages), which
# would make the passage/question split ambiguous; the real question is after the last marker.
_BOOLQ_PASSAGE_NEWLINE = re.compile(r"\nQuestion")


def _convert_boolq(data_dir: Path) -> dict[str, list[Row]]:
    """BoolQ validation in MosaicML format -> super_glue/boolq schema ``question, passage, idx, label``.

    The MosaicML query is ``"Passage: {passage}\\nQuestion: {question}?"``. The question is the text after
    the *last* ``"\\nQuestion: "`` without the trailing ``"?"`` (stock appends it). Inside passages
    MosaicML turned ``" question"`` into ``"\\nQuestion"``; those are turned back into ``" question"``
    (lower case: the original case is lost, title-case uses such as a book title become lower case).

    Not recoverable: SuperGLUE passages start with ``"<Wikipedia title> -- "`` (e.g. ``"Ethanol fuel --
    All biomass ..."``), MosaicML kept only the paragraph. All :data:`BOOLQ_NOTITLE_DOCS` local prompts
    lack that title prefix, so the lm-eval task built from these rows is ``boolq_notitle`` (see
    ``evaluation/tasks/boolq_local.yaml``) and its scores are not comparable with stock ``boolq``.
    """
    out = []
    for i, row in enumerate(_read_jsonl(data_dir / "boolq" / "boolq.jsonl")):
        query = row["query"]
        head, sep, question = query.rpartition("\nQuestion: ")
        if not sep or not head.startswith("Passage: ") or not question.endswith("?"):
            raise ValueError(f"boolq row {i}: unexpected query layout: {query[:60]!r}...{query[-40:]!r}")
        if list(row["choices"]) != ["no", "yes"]:
            raise ValueError(f"boolq row {i}: choices {row['choices']} are not ['no', 'yes']")
        passage = _BOOLQ_PASSAGE_NEWLINE.sub(" question", head[len("Passage: "):])
        out.append({"question": question[:-1], "passage": passage, "idx": i, "label": int(row["gold"])})
    return {"boolq/validation.jsonl": out}


def _convert_openbookqa(data_dir: Path) -> dict[str, list[Row]]:
    """OpenBookQA main test in MosaicML format -> allenai/openbookqa ``id, question_stem, choices, answerKey``.

    ``query`` is the question stem verbatim; ``id`` is synthesised and labels are ``A..D``.
    """
    out = []
    for i, row in enumerate(_read_jsonl(data_dir / "openbookqa" / "openbook_qa.jsonl")):
        choices, key = _mosaic_choices(row)
        out.append({"id": f"openbookqa/test/{i}", "question_stem": row["query"], "choices": choices, "answerKey": key})
    return {"openbookqa/test.jsonl": out}


def _convert_lambada_openai(data_dir: Path) -> dict[str, list[Row]]:
    """LAMBADA (OpenAI's detokenised test set, 5,153 passages) as ``{context, continuation}`` -> the
    EleutherAI/lambada_openai schema ``text``.

    The local file splits each passage at its last space-separated word; the stock task splits ``text``
    the same way (``text.split(' ')[:-1]`` is the prompt, ``' ' + text.split(' ')[-1]`` the target), so
    ``text = context + " " + continuation`` renders every document as stock does, provided the split is
    exactly that one: a continuation holding a space, or a context ending in one, would move the split,
    and is refused. (A continuation may hold a newline: stock splits on spaces only, so it keeps it too.)
    """
    out = []
    for i, row in enumerate(_read_jsonl(data_dir / "lambada_openai" / "lambada_openai.jsonl")):
        context, continuation = row["context"], row["continuation"]
        if not continuation or " " in continuation or context.endswith(" "):
            raise ValueError(f"lambada_openai row {i}: the passage does not split at its last space "
                             f"(context ends {context[-20:]!r}, continuation {continuation!r})")
        out.append({"text": f"{context} {continuation}"})
    _check_count("lambada_openai", out, LAMBADA_OPENAI_DOCS)
    return {"lambada_openai/test.jsonl": out}


def _read_mmlu_csv(path: Path, subject: str) -> list[Row]:
    """Read an original hendrycks CSV the way the cais/mmlu loader does (plain ``csv.reader``)."""
    rows = []
    with open(path, encoding="utf-8", newline="") as handle:
        for n, fields in enumerate(csv.reader(handle)):
            if len(fields) != 6 or fields[5] not in ("A", "B", "C", "D"):
                raise ValueError(f"{path} row {n}: expected question,A,B,C,D,answer-letter; got {fields!r}")
            rows.append({"question": fields[0], "subject": subject, "choices": fields[1:5], "answer": "ABCD".index(fields[5])})
    return rows


def _convert_mmlu(data_dir: Path) -> dict[str, list[Row]]:
    """MMLU CSVs -> cais/mmlu schema ``question, subject, choices:list, answer:int``, test and dev splits.

    Nothing is lost: cais/mmlu was built from these very files with ``csv.reader``.
    """
    out: dict[str, list[Row]] = {}
    for subject in MMLU_SUBJECTS:
        for split in ("test", "dev"):
            out[f"mmlu/{split}/{subject}.jsonl"] = _read_mmlu_csv(data_dir / "mmlu" / split / f"{subject}_{split}.csv", subject)
    return out


_SPECS: dict[str, _Spec] = {
    "piqa": _Spec(("piqa/valid.jsonl", "piqa/valid-labels.lst"), _convert_piqa, "validation"),
    "winogrande": _Spec(("winogrande/dev.jsonl",), _convert_winogrande, "validation"),
    "hellaswag": _Spec(("hellaswag/hellaswag_val_full.txt.bz2",), _convert_hellaswag, "validation"),
    "arc_easy": _Spec(("arc_easy/arc_easy.jsonl",), _convert_arc("arc_easy"), "test"),
    "arc_challenge": _Spec(("arc_challenge/arc_challenge.jsonl",), _convert_arc("arc_challenge"), "test"),
    "boolq": _Spec(("boolq/boolq.jsonl",), _convert_boolq, "validation"),
    "openbookqa": _Spec(("openbookqa/openbook_qa.jsonl",), _convert_openbookqa, "test"),
    "mmlu": _Spec(
        tuple(f"mmlu/{split}/{s}_{split}.csv" for s in MMLU_SUBJECTS for split in ("test", "dev")),
        _convert_mmlu,
        "test",
    ),
    "lambada_openai": _Spec(("lambada_openai/lambada_openai.jsonl",), _convert_lambada_openai, "test"),
}

BENCHMARKS: tuple[str, ...] = tuple(_SPECS)


# ----------------------------------------------------------------------------- public API


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} {path} does not exist. Set ${ENV_VAR} (or data.local_dir in the config) to the folder of "
        "public dataset files listed in the README (Data), and make sure it holds this file."
    )


def _data_files(task: str, outputs: Iterable[str]) -> dict[str, Any]:
    """Split -> relative path, the way the local task configs need it (mmlu: per subject)."""
    if task == "mmlu":
        return {s: {split: f"mmlu/{split}/{s}.jsonl" for split in ("test", "dev")} for s in MMLU_SUBJECTS}
    return {Path(rel).stem: rel for rel in outputs}


def prepare_benchmarks(data_dir: Path, out_dir: Path, tasks: list[str]) -> dict[str, dict]:
    """Convert the raw local files of ``tasks`` into stock-schema JSONL under ``out_dir``.

    Args:
        data_dir: the local data directory (``data.local_dir`` / ``$LAYERFOLD_DATA_DIR``).
        out_dir: where the JSONL files and ``manifest.json`` go.
        tasks: stock lm-eval task names, a subset of :data:`BENCHMARKS`.

    Returns:
        ``{task: metadata}`` with ``rows`` (eval-split rows; for mmlu also ``rows_by_split`` and
        ``subjects``), ``eval_split``, ``data_files`` (split -> path relative to ``out_dir``; for mmlu
        subject -> split -> path), ``sources`` (raw path -> sha256) and ``converter_version``.

    Each task is converted once: if the manifest already records the same source hashes and converter
    version and the outputs exist, the files are left alone. All files are written atomically.

    Raises:
        FileNotFoundError: ``data_dir`` or a source file is missing (names the path and the fix).
        ValueError: unknown task name, or a source file that does not have the expected layout.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    unknown = [t for t in tasks if t not in _SPECS]
    if unknown:
        raise ValueError(f"Unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}.")
    if not data_dir.is_dir():
        raise _missing(data_dir, "Local data directory")
    for task in tasks:
        for rel in _SPECS[task].sources:
            if not (data_dir / rel).is_file():
                raise _missing(data_dir / rel, f"Benchmark '{task}' needs")

    manifest_path = out_dir / MANIFEST
    manifest: dict[str, dict] = read_json(manifest_path) if manifest_path.is_file() else {}
    result: dict[str, dict] = {}
    for task in tasks:
        spec = _SPECS[task]
        sources = {rel: file_sha256(data_dir / rel) for rel in spec.sources}
        old = manifest.get(task)
        if (
            old is not None
            and old.get("sources") == sources
            and old.get("converter_version") == CONVERTER_VERSION
            and all((out_dir / rel).is_file() for rel in old.get("outputs", {}))
        ):
            result[task] = old
            continue
        outputs = {rel: _write_jsonl(out_dir / rel, rows) for rel, rows in spec.convert(data_dir).items()}
        meta: dict[str, Any] = {
            "eval_split": spec.eval_split,
            "data_files": _data_files(task, outputs),
            "sources": sources,
            "outputs": outputs,
            "converter_version": CONVERTER_VERSION,
        }
        if task == "mmlu":
            by_split = {split: sum(n for rel, n in outputs.items() if rel.startswith(f"mmlu/{split}/")) for split in ("test", "dev")}
            meta.update(rows=by_split["test"], rows_by_split=by_split, subjects=len(MMLU_SUBJECTS))
        else:
            meta["rows"] = sum(outputs.values())
        result[task] = meta
        manifest[task] = meta
        # Rewrite the manifest after every task so an interrupted run keeps what it finished.
        write_json(manifest_path, manifest)
    return result


def source_files(task: str) -> tuple[str, ...]:
    """The raw files (relative to the data directory) that ``task`` is converted from."""
    return _SPECS[task].sources
