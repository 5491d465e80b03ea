"""The released ReplaceMe and LinearPatch repositories, the settings of a 2025 parity run, and the adapters around their code."""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from parity.released import RELEASED as ALL_RELEASED
from parity.runner import Settings as SeedSettings, _is_cuda


RELEASED = {name: ALL_RELEASED[name] for name in ("replaceme", "linear_patch")}
METHODS = tuple(RELEASED)


@dataclass
class Settings(SeedSettings):
    """A 2025 parity run's settings: the seed comparison's (:class:`parity.runner.Settings`, calibration data folder
    included) with shorter blocks by default and what LinearPatch's layerfold side is handed by the released side."""

    seq_len: int = 128
    window: list[int] | None = None  # linear_patch: the released code's block, handed to layerfold's side
    released_rotation: bool = False  # linear_patch: layerfold's side uses the released Hadamard matrix
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def cuda_factories_to(device: torch.device) -> Iterator[None]:
    """``torch.zeros/ones/eye/empty(..., device="cuda")`` on ``device`` when it is not CUDA (ReplaceMe allocates its sums so)."""
    if device.type == "cuda":
        yield
        return
    originals = {name: getattr(torch, name) for name in ("zeros", "ones", "eye", "empty")}

    def redirect(factory: Callable) -> Callable:
        def call(*args, **kwargs):
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = device
            return factory(*args, **kwargs)
        return call

    for name, factory in originals.items():
        setattr(torch, name, redirect(factory))
    try:
        yield
    finally:
        for name, factory in originals.items():
            setattr(torch, name, factory)


@contextlib.contextmanager
def stubbed_modules(**modules: types.ModuleType) -> Iterator[None]:
    """Modules that are not installed, present in ``sys.modules`` for the block (only where missing)."""
    added = [name for name in modules if importlib.util.find_spec(name) is None and name not in sys.modules]
    for name in added:
        sys.modules[name] = modules[name]
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def own_files_unpickled() -> Iterator[None]:
    """``torch.load`` with ``weights_only=False`` (the default before torch 2.6): ReplaceMe reloads its own distances.pth,
    a list of numpy floats, which the weights-only unpickler of this torch refuses."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _stub(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _unavailable(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("torchmin is not installed here; ReplaceMe calls it only with solver != 'adam'.")


class TextBlocks:
    """ReplaceMe's tokenizer: a "text" is a token block already; returns the padded batch the real tokenizer would."""

    pad_token = eos_token = "</s>"

    def __call__(self, batch: Sequence[torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        ids = torch.stack(list(batch))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        pass


class ReplaceMeModels:
    """``AutoModelForCausalLM`` for ReplaceMe: the local model (``output_hidden_states`` set as asked); a call that asks for
    bfloat16 (its reload before folding) gets a bfloat16 copy of the same, unmodified weights."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls: list[dict] = []

    def from_pretrained(self, path: Any, **kwargs: Any) -> torch.nn.Module:
        self.calls.append({k: str(v) for k, v in kwargs.items()})
        if kwargs.get("torch_dtype") is not None:
            clone = copy.deepcopy(self.model).to(kwargs["torch_dtype"])
            clone.config.output_hidden_states = False
            return clone
        self.model.config.output_hidden_states = bool(kwargs.get("output_hidden_states", False))
        return self.model
