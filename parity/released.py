"""The released repositories: which commit and files of each, fetched outside this repository."""

from __future__ import annotations

import datetime as dt
import io as _io
import json
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfold.io import atomic_dir, read_json


REPO = Path(__file__).resolve().parents[1]


DEFAULT_RELEASED_DIR = Path("~/.cache/layerfold/released")
METHODS = ("laco", "shortgpt", "mka", "come", "come_p", "streamline")


@dataclass(frozen=True)
class ReleasedRepo:
    """A released implementation pinned to the commit read for layerfold's parity modes."""

    repo: str  # owner/name on GitHub
    commit: str
    paths: tuple[str, ...]  # files and folders the check needs (nothing else is copied)

    @property
    def folder(self) -> str:
        return self.repo.split("/")[1]


RELEASED = {
    "laco": ReleasedRepo("yangyifei729/LaCo", "84835877f918dc972df1a1375e09209551e02f3d", ("laco_llama-13b.ipynb", "LICENSE")),
    "shortgpt": ReleasedRepo("icip-cas/ShortGPT", "9a2ee8dfe9e28d0bee430e83c140b787c02ddd6c", ("shortgpt", "README.md")),
    "mka": ReleasedRepo("SempraETY/Pruning-via-Merging", "3b60b002a0963266e2f4ca78f133b4e091bc607a", ("pipeline.py", "README.md")),
    "come": ReleasedRepo("WangFei-2019/CoMe", "7bb695adba4b69df45020e281348e99739824c39", ("methods", "utils", "models_unit/llama", "LICENSE")),
    "streamline": ReleasedRepo("RUCKBReasoning/LLM-Streamline", "adf50baa83a1fabb644a2bd165fb9636838ff00b",
                               ("LLM_Streamline", "args.py", "mseloss_entry.py", "README.md")),
}
RELEASED["come_p"] = RELEASED["come"]  # the same repository: concat_merge_P.py
# The 2025 methods' codebases (parity.methods_2025): one registry, so fetching and --git-dir know every repository
RELEASED["replaceme"] = ReleasedRepo("mts-ai/ReplaceMe", "5bb71d99da40c8b0ba0df488589e14d77ced7fee", ("ReplaceMe", "readme.md"))
RELEASED["linear_patch"] = ReleasedRepo("chenxinrui-tsinghua/LinearPatch", "d1274e8782676d13f1f006cae4405db5d0f96721",
                                        ("layer_select.py", "block_scaling.py", "rotate_utils", "LICENSE", "README.md"))
PROVENANCE = "PROVENANCE.json"


class ReleasedCodeMissing(FileNotFoundError):
    """The released code is not in the released directory and could not be obtained."""


def released_path(released_dir: Path, method: str) -> Path:
    return Path(released_dir).expanduser() / RELEASED[method].folder


def check_outside_repository(released_dir: Path) -> None:
    """The released code is third-party code under its own licenses: it never goes into this repository."""
    resolved = Path(released_dir).expanduser().resolve()
    if resolved == REPO or REPO in resolved.parents:
        raise ReleasedCodeMissing(
            f"--released-dir {released_dir} is inside this repository ({REPO}); choose a folder outside it, "
            f"e.g. the default {DEFAULT_RELEASED_DIR}."
        )


def released_provenance(released_dir: Path, method: str) -> dict | None:
    """The provenance record of a complete copy at the pinned commit, or None."""
    folder = released_path(released_dir, method)
    spec = RELEASED[method]
    if not (folder / PROVENANCE).is_file():
        return None
    record = read_json(folder / PROVENANCE)
    complete = all((folder / p).exists() for p in spec.paths)
    return record if complete and record.get("commit") == spec.commit else None


def _git(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], check=True, capture_output=True, timeout=600, **kwargs)


def fetch_released(method: str, released_dir: Path, git_dir: Path | None = None) -> dict:
    """Copy the pinned commit's files of ``method``'s repository into ``released_dir``; returns the provenance.

    From ``git_dir`` (a local clone or bare repository of it) when given, else ``git clone`` over the
    network. Only ``spec.paths`` are written; an existing complete copy is kept.
    """
    spec = RELEASED[method]
    check_outside_repository(released_dir)
    existing = released_provenance(released_dir, method)
    if existing is not None:
        return existing
    with tempfile.TemporaryDirectory() as scratch:
        if git_dir is None:
            source = Path(scratch) / "clone"
            try:
                _git(["clone", "--quiet", f"https://github.com/{spec.repo}.git", str(source)])
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
                raise ReleasedCodeMissing(
                    f"Could not clone https://github.com/{spec.repo} ({err}). Without network, pass a local copy: "
                    f"`python -m parity fetch --git-dir {spec.repo}=<path to its git directory>`, or point "
                    f"--released-dir at a folder that already holds {spec.folder}/ with {PROVENANCE}."
                ) from None
            git_dir, origin = source / ".git", f"git clone https://github.com/{spec.repo}"
        else:
            origin = "a local git copy of the repository"
        try:
            _git(["--git-dir", str(git_dir), "cat-file", "-e", f"{spec.commit}^{{commit}}"])
        except subprocess.CalledProcessError:
            raise ReleasedCodeMissing(f"{git_dir} does not contain commit {spec.commit} of {spec.repo}; fetch it first.") from None
        archive = _git(["--git-dir", str(git_dir), "archive", "--format=tar", spec.commit, *spec.paths]).stdout
        with atomic_dir(released_path(released_dir, method)) as tmp:
            with tarfile.open(fileobj=_io.BytesIO(archive)) as tar:
                tar.extractall(tmp, filter="data")
            record = {"repo": spec.repo, "commit": spec.commit, "paths": list(spec.paths), "obtained_from": origin,
                      "date": dt.date.today().isoformat()}
            (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
