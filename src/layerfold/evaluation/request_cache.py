"""lm-eval's request cache, stored as data only.

lm-eval caches the requests it builds (few-shot contexts, one ``Instance`` per answer choice) with
``dill``: loading such a file runs whatever code it names, so a file planted in the cache folder would
run during ``evaluate``. :func:`install` replaces lm-eval's ``load_from_cache`` / ``save_to_cache`` (as
``lm_eval.api.task`` imported them) by a gzip-compressed JSON file per task with a sha256 over its
content: strings, numbers and the ``Instance`` fields, nothing executable. A file that does not parse,
has another format or fails the check is ignored with a warning and lm-eval builds the requests again
(and writes them again). lm-eval's own ``*.pickle`` files are never read.

The cache key is lm-eval's (task, shots, rank, world size, chat template, tokenizer name) inside the
folder :func:`layerfold.evaluation.runner.request_cache_key` names after lm-eval's version and the
task files' content.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1
SUFFIX = ".requests.json.gz"


def cache_path(file_name: str) -> Path:
    """The file for lm-eval's cache key ``file_name`` in the folder lm-eval's ``cache.PATH`` points at."""
    from lm_eval.caching import cache

    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", file_name)
    if len(safe) > 180:  # keep names within file-system limits, unique through a hash of the full key
        safe = safe[:160] + "-" + hashlib.sha256(file_name.encode()).hexdigest()[:16]
    return Path(cache.PATH) / f"{safe}{SUFFIX}"


def _digest(payload: bytes) -> str:
    return hashlib.sha256(b"layerfold-request-cache" + payload).hexdigest()


def encode(groups: list[list[Any]]) -> dict[str, Any]:
    """lm-eval's cached object (one list of ``Instance`` per document) as JSON-ready data; strings that
    several instances share (a question's context) are stored once."""
    strings: dict[str, int] = {}

    def ref(text: str) -> int:
        return strings.setdefault(text, len(strings))

    out = []
    for group in groups:
        first = group[0]
        out.append({
            "doc": first.doc,
            "type": first.request_type,
            "meta": list(first.metadata),
            "requests": [{"args": [ref(a) for a in inst.arguments], "idx": inst.idx} for inst in group],
        })
        for inst in group:
            same_doc = inst.doc is first.doc or inst.doc == first.doc
            same_meta = list(inst.metadata) == list(first.metadata) and inst.request_type == first.request_type
            if not (same_doc and same_meta and all(isinstance(a, str) for a in inst.arguments)):
                raise TypeError("a request group this cache cannot store as data (mixed documents or non-string arguments)")
    return {"strings": list(strings), "groups": out}


def decode(data: dict[str, Any]) -> list[list[Any]]:
    """Inverse of :func:`encode`: fresh ``Instance`` objects, as lm-eval builds them."""
    from lm_eval.api.instance import Instance

    strings = data["strings"]
    groups = []
    for group in data["groups"]:
        meta = tuple(group["meta"])
        if len(meta) != 3 or not isinstance(group["doc"], dict) or not isinstance(group["type"], str):
            raise ValueError("malformed request group")
        groups.append([Instance(request_type=group["type"], doc=group["doc"], arguments=tuple(strings[i] for i in r["args"]),
                                idx=int(r["idx"]), metadata=meta) for r in group["requests"]])
    return groups


def load(file_name: str, cache: bool = False) -> list[list[Any]] | None:
    """``lm_eval.caching.cache.load_from_cache``'s contract, from a checked data-only file."""
    if not cache:
        return None
    path = cache_path(file_name)
    try:
        raw = gzip.decompress(path.read_bytes())
        header, _, payload = raw.partition(b"\n")
        meta = json.loads(header)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        if meta.get("sha256") != _digest(payload):
            raise ValueError("content does not match its sha256 (damaged or edited)")
        return decode(json.loads(payload))
    except FileNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001 - any unreadable file is ignored the same way
        log.warning("Ignoring request cache %s (%s); lm-eval builds the requests again and rewrites it.", path, error)
        return None


def save(file_name: str, obj: list[list[Any]]) -> None:
    """``lm_eval.caching.cache.save_to_cache``'s contract, as a checked data-only file (atomic write)."""
    path = cache_path(file_name)
    try:
        payload = json.dumps(encode(obj), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as error:
        log.warning("Not caching %s: %s", file_name, error)
        return
    header = json.dumps({"format": FORMAT, "sha256": _digest(payload)}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(gzip.compress(header + b"\n" + payload, compresslevel=1))
    os.replace(tmp, path)


def install() -> None:
    """Route lm-eval's request cache through :func:`load` / :func:`save` (idempotent)."""
    import lm_eval.api.task as task_module

    task_module.load_from_cache = load
    task_module.save_to_cache = save
