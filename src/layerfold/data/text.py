"""Raw text corpora from a local directory of public files, with the hub as fallback.

The local directory holds the files listed in the project's data sources table (WikiText-2 raw test
and a train excerpt, 2k C4 validation documents, benchmark files). Its location comes from
``data.local_dir`` or ``$LAYERFOLD_DATA_DIR``; without either, the Hugging Face hub is used.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from layerfold.io import DamagedFileError, MissingFileError, file_sha256

ENV_VAR = "LAYERFOLD_DATA_DIR"
# The fix for a damaged file in the data directory, in every reader's message.
DATA_FIX = (f"Copy an intact file there from its public source (README, Data), or point ${ENV_VAR} (or data.local_dir) "
            "at a folder that has one.")
# Characters no natural-language text is made of: controls (other than tab and line ends), private-use,
# surrogate and unassigned code points. More than this share of them means the file is not text.
NOT_TEXT = ("Cc", "Co", "Cs", "Cn")
MAX_NOT_TEXT_SHARE = 0.01

# corpus name -> (path inside the local data dir, hub fallback)
LOCAL_FILES: dict[str, str] = {
    "wikitext2_train": "wikitext-2-raw-train-excerpt/wikitext2_train_5k.txt",
    "wikitext2_test": "wikitext-2-raw-test/wikitext-test.txt",
    "c4": "c4-validation-2k/c4_validation_2k.parquet",
}
# data.calibration.source -> corpus name (the C4 calibration half never overlaps the evaluation half)
CALIBRATION_SOURCES = {"wikitext2_train": "wikitext2_train", "c4": "c4_calibration"}
# The local C4 file is one 2k-document set: evaluation reads the first half, calibration the second,
# so calibration never sees evaluation text.
C4_EVAL_DOCS = 1000


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: list[str]
    origin: str  # "local:<path inside the data directory>" or "hub:<name>"
    sha256: Optional[str] = None

    @property
    def text(self) -> str:
        return "\n\n".join(self.documents)


def data_dir(configured: str | None) -> Path | None:
    """The local data directory, or None to use the hub. A configured but missing directory is an error."""
    value = configured or os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise MissingFileError(
            f"Local data directory {path} does not exist. Point data.local_dir or ${ENV_VAR} at the folder of "
            "public dataset files (see README, Data), or unset both to download from the hub."
        )
    return path



def _local_file(root: Path, name: str) -> Path:
    path = root / LOCAL_FILES[name]
    if not path.exists():
        raise MissingFileError(
            f"Corpus '{name}' needs {path}, which is missing. Copy that file into the data directory "
            f"({root}) or point ${ENV_VAR} at a directory that has it."
        )
    return path


def read_text(path: Path, rel: str) -> str:
    """A data file's UTF-8 text; an empty, undecodable or non-text file raises :class:`DamagedFileError`
    naming the file (``rel``: its path inside the data directory), the line and the fix."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DamagedFileError(f"Data file {rel} ({path}) is empty; expected UTF-8 text. {DATA_FIX}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DamagedFileError(f"Data file {rel}, line {line}: not UTF-8 text (byte {err.start}: {err.reason}); "
                               f"expected UTF-8 text. {DATA_FIX}") from None
    check_text(text, f"Data file {rel}")
    return text


def check_text(text: str, what: str) -> None:
    """Raise :class:`DamagedFileError` when ``text`` is empty or more than 1 % control, private-use or
    unassigned characters (or U+FFFD, what a lossy decode leaves): a file of noise, not of language."""
    if not text.strip():
        raise DamagedFileError(f"{what} holds no text. {DATA_FIX}")
    bad, first = 0, None
    for number, line in enumerate(text.split("\n"), start=1):
        if line.replace("\t", " ").replace("\r", "").isprintable():  # the fast path: almost every line of real text
            continue
        for char in line:
            if char == "\ufffd" or (char not in "\t\r" and unicodedata.category(char) in NOT_TEXT):
                bad += 1
                first = first or (number, char)
    if bad > MAX_NOT_TEXT_SHARE * len(text):
        line, char = first
        raise DamagedFileError(
            f"{what} is not text: {bad / len(text):.0%} of its {len(text):,} characters are control, unassigned or "
            f"replacement characters (the first, U+{ord(char):04X}, on line {line}); expected natural-language text. {DATA_FIX}"
        )


def _wikitext_rows(text: str) -> list[str]:
    # The files are "\n\n".join(rows) with CRLF line ends; strip \r so token counts match the hub text.
    return text.replace("\r", "").split("\n\n")


def load_corpus(name: str, local_dir: str | None) -> Corpus:
    """Load ``wikitext2_train``, ``wikitext2_test``, ``c4`` (eval half) or ``c4_calibration``."""
    base = "c4" if name.startswith("c4") else name
    if base not in LOCAL_FILES:
        raise ValueError(f"Unknown corpus '{name}'; choose one of: wikitext2_train, wikitext2_test, c4, c4_calibration.")
    root = data_dir(local_dir)
    if root is not None:
        path = _local_file(root, base)
        if base == "c4":
            docs = _parquet_texts(path, LOCAL_FILES[base])
        else:
            docs = _wikitext_rows(read_text(path, LOCAL_FILES[base]))
        # Relative to the data directory: outputs must not depend on where a machine keeps its files.
        origin, sha = f"local:{LOCAL_FILES[base]}", file_sha256(path)
    else:
        docs, origin, sha = _hub_documents(base), f"hub:{base}", None
    if base == "c4":
        docs = docs[:C4_EVAL_DOCS] if name == "c4" else docs[C4_EVAL_DOCS:]
    return Corpus(name=name, documents=docs, origin=origin, sha256=sha)


def _parquet_texts(path: Path, rel: str) -> list[str]:
    """The ``text`` column of a parquet file, checked: readable, present, strings, and text (:func:`check_text`)."""
    import pandas as pd

    try:
        column = pd.read_parquet(path, columns=["text"])["text"]
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError or KeyError for a damaged file or a missing column
        raise DamagedFileError(f"Data file {rel} is not a readable parquet file with a 'text' column "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). {DATA_FIX}") from None
    docs = column.tolist()
    for row, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise DamagedFileError(f"Data file {rel}, row {row}: 'text' is {type(doc).__name__}, expected a string. {DATA_FIX}")
    check_text("\n\n".join(docs), f"Data file {rel}")
    return docs


def _hub_documents(name: str) -> list[str]:
    """Hub fallback for users with network access; offline runs never reach this."""
    try:
        from datasets import load_dataset

        if name.startswith("wikitext2"):
            split = "train" if name.endswith("train") else "test"
            return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
        shard = "en/c4-validation.00000-of-00008.json.gz"
        rows = load_dataset("allenai/c4", data_files={"validation": shard}, split="validation")
        return list(rows["text"][: 2 * C4_EVAL_DOCS])
    except Exception as err:  # the datasets library raises many kinds of connection errors
        raise MissingFileError(
            f"Could not load '{name}' from the hub ({type(err).__name__}: {err}). Offline, set ${ENV_VAR} "
            "(or data.local_dir) to the local folder of dataset files."
        ) from err


def token_ids(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """The token ids of a text of any length.

    Corpora are tokenized whole and cut into windows afterwards, so a text far longer than the model's
    context is expected here; ``verbose=False`` keeps the tokenizer's "longer than the specified maximum
    sequence length" warning (a 300-character line per process) out of the stage logs.
    """
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])
