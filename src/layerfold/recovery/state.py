"""Recovery's resumable state: the trained tensors, optimiser, schedule and position of a run, written atomically
every ``checkpoint_every`` steps so a killed run resumes from the last one and ends with the same weights.

The state belongs to the settings and data it was written for (:func:`fingerprint`); a state written for others is
ignored, a damaged one is an error naming the folder to delete. Under several processes every process takes part in
saving (FSDP2 gathers the shards of the optimiser state by parameter name) and the main process alone writes; every
process reads the state on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerfold.io import DamagedFileError, atomic_file, payload_bytes
from layerfold.recovery.distributed import copy_full_into, full_tensor

log = logging.getLogger(__name__)


def fingerprint(*parts: object) -> str:
    """A short digest of what a state was written for (settings, plan, data, sharding)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrainingState:
    """The resumable state of one run in ``state_dir`` (None: no checkpoints), for runs of ``fingerprint``.

    ``sharded``: the trained module is FSDP2-sharded, so the optimiser state is gathered and restored by parameter
    name (a replicated one is keyed by parameter id: the two are not interchangeable).
    """

    def __init__(self, state_dir: Path | str | None, fingerprint: str, sharded: bool) -> None:
        self.path = None if state_dir is None else Path(state_dir) / "state.pt"
        self.fingerprint = fingerprint
        self.sharded = sharded

    def _optimizer_state(self, module: nn.Module, optimizer: Any) -> dict:
        """The whole optimiser state: replicated on every process (none / DDP), or gathered by parameter name (FSDP2, a collective)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer(self, module: nn.Module, optimizer: Any, state: dict) -> None:
        """Restore the optimiser state a :meth:`load` returned into the prepared ``optimizer`` of ``module``."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def save(self, main_process: bool, student: nn.Module, tracked: list[str], module: nn.Module, optimizer: Any, scheduler: Any,
             position: dict[str, Any]) -> None:
        """Every process takes part (FSDP2 gathers shards); the main process alone writes, atomically.

        ``tracked``: the names of the student's trained parameters; ``position``: phase, step, curve, validation, results.
        """
        if self.path is None:
            return
        params = dict(student.named_parameters())
        tensors = {n: full_tensor(params[n].detach()).cpu().clone() for n in tracked}
        optimizer_state = self._optimizer_state(module, optimizer)
        if not main_process:
            return
        state = {
            "fingerprint": self.fingerprint,
            "phase": position["phase"],
            "step": position["step"],
            "tensors": tensors,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "curve": position["curve"],
            "validation": position["validation"],
            "results": position["results"],
        }
        with atomic_file(self.path, "wb", expected_bytes=payload_bytes(state)) as handle:
            torch.save(state, handle)

    def load(self, student: nn.Module) -> dict | None:
        """The state to resume from, its trained tensors copied into the plain (not yet prepared) ``student``; None when
        there is none or it was written for other settings or data."""
        path = self.path
        if path is None or not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated zip, a bad pickle: torch raises several kinds
            raise DamagedFileError(
                f"The resumable recovery state {path} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
                f"Delete {path.parent} to start the recovery from its first step."
            ) from None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring %s: it was written for other settings or data", path)
            return None
        params = dict(student.named_parameters())
        with torch.no_grad():
            for name, tensor in state["tensors"].items():
                copy_full_into(params[name], tensor)
        log.info("resuming from %s: phase %d, step %d", path, state["phase"], state["step"])
        return state

    def clear(self) -> None:
        """Remove the state of a finished run."""
        if self.path is not None and self.path.exists():
            self.path.unlink()
