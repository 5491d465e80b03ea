"""Atomic writes and checked reads: a stage that fails must leave nothing that looks finished, and say why in one line.

Outputs are written to a hidden sibling ``.<name>.tmp-<pid>-<random>`` and renamed onto their path on
success. A process killed with SIGKILL cannot clean up after itself, so :func:`remove_stale_temps`
(called when the next stage starts) deletes temps whose writing process no longer runs.

A write the machine refuses (disk full, a quota, the per-file size limit of ``ulimit -f``, a read-only
folder) surfaces from the libraries in many shapes: ``OSError`` from Python, ``SafetensorError`` with the OS
text inside, torch's ``[enforce fail at inline_container.cc]`` with the OS error only in its context or
nowhere. :func:`atomic_dir` and :func:`atomic_file` turn every one of them into one :class:`OutputWriteError`
that names the output, about how many bytes it needed and what to free, after removing their temp.
Damaged inputs get the same treatment from :func:`read_json` and :func:`read_jsonl`
(:class:`DamagedFileError`: file, line, what was expected, the fix). :func:`install_error_hook` prints
both, and layerfold's other errors, as one line instead of a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


class OutputWriteError(OSError):
    """The machine refused an output write: disk full, quota, file-size limit or a read-only folder."""

    needed: int | None = None  # about the bytes the output needed

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class MissingFileError(FileNotFoundError):
    """An input file that is not there, with where it should be and the fix."""


class DamagedFileError(ValueError):
    """An input file that is not what it should be (not JSON, a bad line, empty, not text), with where and the fix."""


# errno values of a refused write, and the OS texts libraries keep when they drop the errno
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
TOO_LARGE = (errno.EFBIG,)
NOT_WRITABLE = (errno.EROFS,)  # EACCES inside a block may be a read; only creating the temp tells (see _creation_refused)
_TEXTS = {
    "No space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC, "StorageFull": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT, "os error 122": errno.EDQUOT,
    "File too large": errno.EFBIG, "os error 27": errno.EFBIG, "FileTooLarge": errno.EFBIG,
    "Read-only file system": errno.EROFS, "os error 30": errno.EROFS,
}
LOW_SPACE = 16 << 20  # bytes free under which a write failure that names no cause is taken as a full disk


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, not ours to judge
        return True
    return True


def remove_stale_temps(folders: Iterable[str | Path]) -> list[Path]:
    """Delete the ``.*.tmp-<pid>-*`` leftovers in ``folders`` whose writing process is gone; return them.

    Temps of a process still running (another stage writing next door) are left alone; temps in the
    older ``.*.tmp-<random>`` form carry no pid and are treated as stale.
    """
    removed = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for tmp in folder.glob(".*.tmp-*"):
            pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
                continue
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(path: str | Path, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory and move it onto ``path`` only if the block succeeds.

    ``expected_bytes`` (about what the directory will hold, when the caller knows) goes into the message
    should the machine refuse a write; without it the message gives what was written before the failure.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    except OSError as err:
        failure = _creation_refused(err, path, expected_bytes)
        if failure is None:
            raise
        raise failure from err
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs should look like any other directory
    try:
        yield tmp
    except BaseException as err:
        failure = _explained(err, path, tmp, expected_bytes)
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from err
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", expected_bytes: int | None = None) -> Iterator[Any]:
    """Open a temporary sibling file for writing; rename it onto ``path`` when the block succeeds.

    ``expected_bytes``: as for :func:`atomic_dir`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    except OSError as err:
        failure = _creation_refused(err, path, expected_bytes)
        if failure is None:
            raise
        raise failure from err
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
    except BaseException as err:
        failure = _explained(err, path, Path(tmp), expected_bytes)
        Path(tmp).unlink(missing_ok=True)
        if failure is not None:
            raise failure from err
        raise
    os.replace(tmp, path)


def _explained(err: BaseException, path: Path, tmp: Path | None, expected: int | None) -> OutputWriteError | None:
    """:func:`_refused`, never raising itself: explaining a failure must not hide it."""
    try:
        return _refused(err, path, tmp, expected)
    except Exception:
        return None


def _write_errno(err: BaseException) -> int | None:
    """The errno behind a failed write, from the exception, its causes and contexts, or the OS text they kept."""
    seen: BaseException | None = err
    for _ in range(8):  # chains are short; a cycle must not hang the error path
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (*DISK_FULL, *TOO_LARGE, *NOT_WRITABLE):
            return seen.errno
        for text, code in _TEXTS.items():
            if text in str(seen):
                return code
        seen = seen.__cause__ or seen.__context__
    return None


def _size(path: Path | None) -> int:
    """Bytes under ``path`` (a file or a directory tree), 0 when it is gone."""
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _largest_file(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return max((f.stat().st_size for f in path.rglob("*") if f.is_file()), default=0)


def _file_size_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def human_bytes(count: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _refused(err: BaseException, path: Path, tmp: Path | None, expected: int | None) -> OutputWriteError | None:
    """One :class:`OutputWriteError` for a write the machine refused, or None for any other failure.

    torch's writer can lose the OS error entirely (``basic_ios::clear``); a write failure that names no
    cause counts as a full disk or a file-size limit when the disk is (nearly) full or a file reached the limit.
    """
    if isinstance(err, OutputWriteError):  # an inner atomic write already explained it: name this output instead
        inner = getattr(err, "needed", None)
        code, expected = err.errno, max(expected or 0, inner or 0) or None
    elif not isinstance(err, Exception):
        return None  # KeyboardInterrupt, SystemExit: not a refused write
    else:
        code = _write_errno(err)
    written = _size(tmp)
    if code is None and any(word in str(err).lower() for word in ("write", "writ", "inline_container", "serializ")):
        limit = _file_size_limit()
        if limit is not None and _largest_file(tmp) >= limit:
            code = errno.EFBIG
        elif _free_bytes(path) < LOW_SPACE:
            code = errno.ENOSPC
    if code is None:
        return None
    needed = max(expected or 0, written) or None
    shown = shown_path(path)
    if code in DISK_FULL:
        free = _free_bytes(path)
        amount = f"about {human_bytes(expected)}" if expected else f"more than the {human_bytes(written)} written before it failed"
        short = f" (at least {human_bytes(expected - free)} more)" if expected and expected > free else ""
        reason = "the disk quota is used up" if code == errno.EDQUOT else "the disk is full"
        message = (
            f"Could not write {shown}: {reason}. It needs {amount}; {human_bytes(free)} is free on the filesystem holding "
            f"{_mount_point(path)}. Free space there{short}: `dvc gc --workspace` removes cached outputs that no "
            "commit or experiment in this workspace uses, and old experiment folders (.dvc/tmp/exps) or "
            "artifacts/recovery-state can go; or move the repository, or the DVC cache (`dvc cache dir`), to a larger disk. "
            "The half-written temp was removed; nothing at that path looks finished."
        )
    elif code in TOO_LARGE:
        limit = _file_size_limit()
        cap = (f"this process may write at most {human_bytes(limit)} per file (`ulimit -f`)" if limit is not None
               else "the filesystem's largest file is smaller")
        amount = f"about {human_bytes(expected)}" if expected else f"more than {human_bytes(_largest_file(tmp) or written)} in one file"
        message = (
            f"Could not write {shown}: a file grew past the size limit: it needs {amount} and {cap}. Raise the limit in "
            "the shell that runs the stage (`ulimit -f unlimited`), or put the repository on a filesystem that takes "
            "files this large. The half-written temp was removed; nothing at that path looks finished."
        )
    else:
        message = (
            f"Could not write {shown}: {os.strerror(code)}. Make {shown_path(path.parent)} writable for this user "
            "(or run from a writable clone). Nothing at that path looks finished."
        )
    failure = OutputWriteError(code, message)
    failure.needed = needed
    return failure


def _creation_refused(err: OSError, path: Path, expected: int | None) -> OutputWriteError | None:
    """The temp next to ``path`` could not be created: the refused write explained, or None for another failure."""
    if err.errno in (errno.EACCES, errno.EPERM):
        failure = OutputWriteError(err.errno, f"Could not write {shown_path(path)}: {os.strerror(err.errno)}. Make "
                                   f"{shown_path(path.parent)} writable for this user (or run from a writable clone). "
                                   "Nothing at that path looks finished.")
        failure.needed = expected
        return failure
    return _explained(err, path, None, expected)


def _free_bytes(path: Path) -> int:
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _mount_point(path: Path) -> str:
    folder = path.resolve()
    while not folder.exists():
        folder = folder.parent
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return str(folder)


def link_or_copy(source: str | Path, destination: str | Path) -> None:
    """``destination`` as a hard link to ``source`` (no second copy of a large weights file), or a copy where
    the filesystem refuses links. Writers never edit a file in place (:func:`atomic_dir` renames new ones),
    so the two names cannot drift apart."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def portable_path(path: str | Path) -> str:
    """``path`` as tracked outputs record it: relative to the working directory (the repository root, where
    stages and scripts run) when inside it, else only its name under ``<outside>/``. An absolute path names
    one machine; recorded in a result it would make the same result differ from machine to machine."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return f"<outside>/{path.name}"


def payload_bytes(obj: Any) -> int:
    """Bytes of the arrays (anything with ``nbytes``: tensors, numpy arrays) in nested dicts, lists and tuples:
    about what saving ``obj`` writes."""
    if hasattr(obj, "nbytes") and not isinstance(obj, (str, bytes)):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def shown_path(path: str | Path) -> str:
    """``path`` for a message: relative to the working directory (the repository root) when inside it, else in full."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def write_json(path: str | Path, payload: Any) -> None:
    # Serialised first, so a refused write can say exactly how many bytes it needed.
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    with atomic_file(path, expected_bytes=len(text.encode())) as handle:
        handle.write(text)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (model files do not fit comfortably in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def restore_hint(path: str | Path) -> str:
    """How to get a good copy of ``path`` back: from the DVC stage that writes it when there is one."""
    producer = _producer(Path(path))
    if producer is None:
        return "Fix the file, or copy it again from where it came from."
    stage, out = producer
    return (f"It is part of stage '{stage}''s output {out}: restore the cached copy with `dvc checkout --force {out}`, "
            f"or write it again with `dvc repro --force --single-item {stage}`.")


def _producer(path: Path) -> tuple[str, str] | None:
    """``(stage, output)`` of the ``dvc.yaml`` stage whose output holds ``path`` (run from the repository root)."""
    import yaml

    try:
        stages = yaml.safe_load(Path("dvc.yaml").read_text()).get("stages", {})
        rel = Path(os.path.relpath(path.resolve(), Path.cwd().resolve())).as_posix()
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    for name, stage in stages.items():
        for entry in (stage.get("outs") or []) + (stage.get("metrics") or []) + (stage.get("plots") or []):
            out = next(iter(entry)) if isinstance(entry, dict) else entry
            if isinstance(out, str) and "$" not in out and (rel == out or rel.startswith(out.rstrip("/") + "/")):
                return name, out
    return None


def read_json(path: str | Path, fix: str | None = None) -> Any:
    """Parse a JSON file; a damaged one raises :class:`DamagedFileError` naming it, the line, and ``fix``
    (by default, how to restore it from the DVC stage that writes it)."""
    path = Path(path)
    raw = path.read_bytes()
    fix = fix or restore_hint(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DamagedFileError(f"{shown_path(path)}, line {line}: not UTF-8 text (byte {err.start}); expected JSON. {fix}") from None
    if not text.strip():
        raise DamagedFileError(f"{shown_path(path)} is empty; expected JSON. {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedFileError(
            f"{shown_path(path)}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}). {fix}"
        ) from None


def read_jsonl(path: str | Path, fix: str | None = None, same_keys: bool = True) -> list[dict]:
    """The JSON object on every non-blank line of ``path``; a damaged line raises :class:`DamagedFileError`
    with the file, the line number and what was expected; so does a file without a single row.

    ``same_keys``: every row must have the keys of the first (a dataset's rows share one schema), so a
    line cut short or edited into another shape is named here, not as a ``KeyError`` in a converter.
    """
    path = Path(path)
    fix = fix or restore_hint(path)
    rows: list[dict] = []
    first_line = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DamagedFileError(
                    f"{shown_path(path)}, line {number}: not UTF-8 text (byte {err.start} of the line); expected one JSON object per line. {fix}"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # the line end is no part of the row (nor of a column count)
            except json.JSONDecodeError as err:
                raise DamagedFileError(
                    f"{shown_path(path)}, line {number}, column {err.colno}: not valid JSON ({err.msg}); expected one JSON object per line. {fix}"
                ) from None
            if not isinstance(row, dict):
                raise DamagedFileError(
                    f"{shown_path(path)}, line {number}: a JSON {type(row).__name__}, expected one JSON object per line. {fix}"
                )
            if same_keys and rows and not rows[0].keys() <= row.keys():
                missing = ", ".join(repr(k) for k in rows[0] if k not in row)
                raise DamagedFileError(
                    f"{shown_path(path)}, line {number}: no {missing}; expected every row to have the keys of line {first_line} "
                    f"({', '.join(rows[0])}). {fix}"
                )
            first_line = first_line or number
            rows.append(row)
    if not rows:
        raise DamagedFileError(f"{shown_path(path)} holds no rows; expected one JSON object per line. {fix}")
    return rows


def is_layerfold_error(err: BaseException) -> bool:
    """Errors that carry their own explanation and fix: layerfold's own classes and the two above."""
    return isinstance(err, (OutputWriteError, DamagedFileError, MissingFileError)) or type(err).__module__.split(".")[0] in ("layerfold", "pipeline")


def debug_requested() -> bool:
    """Whether the user asked for tracebacks: ``LAYERFOLD_DEBUG=1`` or ``LAYERFOLD_TRACEBACK=1``."""
    return any(os.environ.get(name, "") not in ("", "0") for name in ("LAYERFOLD_DEBUG", "LAYERFOLD_TRACEBACK"))


def install_error_hook(stage: str) -> None:
    """Print layerfold's errors as one line on stderr (exit status 1) instead of a traceback.

    Other exceptions (bugs) keep their traceback; ``LAYERFOLD_DEBUG=1`` (or ``LAYERFOLD_TRACEBACK=1``, or
    ``--debug`` on the command line, taken out of ``sys.argv`` here so argument parsers never see it) keeps
    it for every error.
    """
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
        os.environ["LAYERFOLD_DEBUG"] = "1"  # stages run in this process (scripts/run_methods.py) keep it too
    if debug_requested():
        return
    previous = getattr(sys.excepthook, "layerfold_previous", sys.excepthook)

    def hook(kind: type[BaseException], err: BaseException, tb: Any) -> None:
        if is_layerfold_error(err):
            print(f"[{stage}] {kind.__name__}: {err}", file=sys.stderr, flush=True)
        else:
            previous(kind, err, tb)

    hook.layerfold_previous = previous  # type: ignore[attr-defined]
    sys.excepthook = hook
