"""Raw text corpora from a local directory of public files, with the hub as fallback.

The local directory holds the files listed in the project's data sources table (WikiText-2 raw test
and a train excerpt, 2k C4 validation documents, benchmark files). Its location comes from
``data.local_dir`` or ``$LAYERFOLD_DATA_DIR``; without either, the Hugging Face hub is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from layerfold.io import file_sha256

ENV_VAR = "LAYERFOLD_DATA_DIR"

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
        raise FileNotFoundError(
            f"Local data directory {path} does not exist. Point data.local_dir or ${ENV_VAR} at the folder of "
            "public dataset files (see README, Data), or unset both to download from the hub."
        )
    return path



def _local_file(root: Path, name: str) -> Path:
    path = root / LOCAL_FILES[name]
    if not path.exists():
        raise FileNotFoundError(
            f"Corpus '{name}' needs {path}, which is missing. Copy that file into the data directory "
            f"({root}) or point ${ENV_VAR} at a directory that has it."
        )
    return path


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
            import pandas as pd

            docs = pd.read_parquet(path, columns=["text"])["text"].tolist()
        else:
            docs = _wikitext_rows(path.read_text(encoding="utf-8"))
        # Relative to the data directory: outputs must not depend on where a machine keeps its files.
        origin, sha = f"local:{LOCAL_FILES[base]}", file_sha256(path)
    else:
        docs, origin, sha = _hub_documents(base), f"hub:{base}", None
    if base == "c4":
        docs = docs[:C4_EVAL_DOCS] if name == "c4" else docs[C4_EVAL_DOCS:]
    return Corpus(name=name, documents=docs, origin=origin, sha256=sha)


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
        raise FileNotFoundError(
            f"Could not load '{name}' from the hub ({type(err).__name__}: {err}). Offline, set ${ENV_VAR} "
            "(or data.local_dir) to the local folder of dataset files."
        ) from err
