"""``plan.json`` sealed to the checkpoint it describes.

The compress stage writes the compressed checkpoint and its ``plan.json`` (which original layers every
new layer stands for) as one output. The recover stage trains from the plan, so a plan that is not the
one compress wrote for *these* weights trains the wrong spans silently: a plan edited by hand (spans
still valid), a plan copied from another run, or weights swapped under it. :func:`seal_plan` therefore
adds ``plan["checkpoint"]``:

- ``weights``: one sha256 over every tensor of the checkpoint (name, dtype, shape and the sha256 of its
  bytes), read straight from the safetensors files' byte ranges one MiB at a time (LLM-Streamline's side
  file included): linear in the checkpoint's size (a 70B bf16 checkpoint reads 140 GB once, as any copy of
  it does), never a tensor in memory, and independent of how the tensors are laid out in shards, so the
  resident and the layer-by-layer writers, which write the same tensors, get the same fingerprint;
- ``config``: the sha256 of ``config.json``'s content (depth, shapes, the source's identity);
- ``seal``: the sha256 of the plan's other fields together with those two.

:func:`check_plan` recomputes them before training and refuses a mismatch, naming what differs.
Hashes name file contents only (no paths, no times), so two clones write the same plan.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from layerfold.models.patches import PATCH_FILE
from layerfold.models.replacement import SIDE_FILE

SEAL_KEY = "checkpoint"


class PlanFingerprintError(ValueError):
    """``plan.json`` is not the plan compress wrote for the checkpoint next to it; the message says what differs."""


def _safetensors_digests(path: Path) -> dict[str, list]:
    """``{tensor name: [dtype, shape, sha256 of its bytes]}`` of one safetensors file, read range by range."""
    digests: dict[str, list] = {}
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
        start = 8 + header_len
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0] if item[0] != "__metadata__" else -1):
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            handle.seek(start + begin)
            digest, left = hashlib.sha256(), end - begin
            while left:
                chunk = handle.read(min(left, 1 << 20))
                if not chunk:
                    raise PlanFingerprintError(f"{path} ends inside tensor {name}: the file is truncated.")
                digest.update(chunk)
                left -= len(chunk)
            digests[name] = [entry["dtype"], entry["shape"], digest.hexdigest()]
    return digests


def checkpoint_fingerprint(folder: str | Path) -> dict[str, str]:
    """``{"weights": sha256, "config": sha256}`` of the checkpoint in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    tensors: dict[str, list] = {}
    for path in sorted(folder.glob("*.safetensors")):
        # Shards share one namespace (their split is layout, not content); each side file has its own.
        space = path.name if path.name in (SIDE_FILE, PATCH_FILE) else "model"
        tensors.update({f"{space}:{name}": entry for name, entry in _safetensors_digests(path).items()})
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    return {"weights": _digest(tensors), "config": _digest(config)}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _seal(body: dict[str, Any], fingerprint: dict[str, str]) -> str:
    # The plan as JSON reads it back (int keys become strings, tuples lists), in one canonical form.
    return _digest([json.loads(json.dumps(body)), fingerprint])


def seal_plan(plan: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """``plan`` with ``plan["checkpoint"]``: the fingerprint of the checkpoint in ``folder`` and the seal over both."""
    body = {k: v for k, v in plan.items() if k != SEAL_KEY}
    fingerprint = checkpoint_fingerprint(folder)
    return {**body, SEAL_KEY: {**fingerprint, "seal": _seal(body, fingerprint)}}


def check_plan(plan: dict[str, Any], folder: str | Path, plan_path: str | Path | None = None) -> None:
    """Refuse ``plan`` unless it is the plan sealed with the checkpoint in ``folder``, unchanged on both sides."""
    plan_path = plan_path or Path(folder) / "plan.json"
    redo = "Re-run compress to write the plan and the checkpoint together (`dvc repro compress`, `--force` if DVC thinks it is up to date)."
    recorded = plan.get(SEAL_KEY)
    if not isinstance(recorded, dict) or not {"weights", "config", "seal"} <= set(recorded):
        raise PlanFingerprintError(
            f"{plan_path} carries no fingerprint of its checkpoint (no '{SEAL_KEY}' entry): it was not written by compress "
            f"together with the checkpoint, so nothing says its spans belong to these weights. {redo}"
        )
    body = {k: v for k, v in plan.items() if k != SEAL_KEY}
    recorded_fingerprint = {"weights": recorded["weights"], "config": recorded["config"]}
    restore = f"Restore the folder (`dvc checkout {Path(folder).as_posix()}`) or {redo[0].lower()}{redo[1:]}"
    if _seal(body, recorded_fingerprint) != recorded["seal"]:
        raise PlanFingerprintError(
            f"{plan_path} was changed after compress wrote it: its content no longer matches the seal compress recorded "
            f"(an edited plan would train the wrong spans). {restore}"
        )
    fingerprint = checkpoint_fingerprint(folder)
    changed = [f"its {key}" for key in ("weights", "config") if fingerprint[key] != recorded_fingerprint[key]]
    if changed:
        raise PlanFingerprintError(
            f"The checkpoint in {Path(folder).as_posix()} is not the one {plan_path} describes: {' and '.join(changed)} "
            f"differ from what compress wrote. {restore}"
        )
