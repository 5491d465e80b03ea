"""One run of one side: settings, model, calibration data, measurement (time, peak memory), layerfold's side, and the helpers every adapter uses around released code (never inside its algorithms)."""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerfold.models.devices import host_peak_rss_mib
from parity.released import DEFAULT_RELEASED_DIR, REPO


@dataclass
class Settings:
    """Everything both sides of one comparison share (written to JSON for the worker processes)."""

    checkpoint: str
    device: str = "cpu"
    dtype: str = "float32"
    num_remove: int = 8
    blocks: int = 32
    seq_len: int = 256
    batch_size: int = 4
    released_dir: str = str(DEFAULT_RELEASED_DIR)
    data_dir: str = ""
    mka_memoise: bool = True
    threads: int | None = None  # torch CPU threads (None: torch's default)
    overrides: dict[str, list[str]] = field(default_factory=dict)  # method -> extra conf overrides for layerfold

    def method_config(self, preset: list[str]) -> dict:
        from layerfold.config import compose

        return compose(REPO / "conf", preset)["method"]


@dataclass
class Outcome:
    """What one side produced: its decisions and scores (JSON), final weights, and its measurement."""

    record: dict
    state: dict[str, torch.Tensor]
    measurement: dict


def load_model(settings: Settings, dtype: str | None = None):
    """The checkpoint on the run's device, in the run's dtype or ``dtype`` (LinearPatch's released code works in
    float16); the same call for both sides."""
    from layerfold.models import load_checkpoint

    return load_checkpoint(settings.checkpoint, torch.device(settings.device), getattr(torch, dtype or settings.dtype))


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the state dict (tied tensors become independent copies)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def calibration_blocks(settings: Settings, tokenizer) -> tuple[torch.Tensor, dict]:
    """The pipeline's calibration policy (``data.calibration``) at the run's block count and length."""
    from omegaconf import OmegaConf

    from layerfold.config import compose
    from layerfold.data.calibration import build_calibration

    cfg = compose(REPO / "conf", [])["data"]["calibration"]
    cfg.update(num_blocks=settings.blocks, seq_len=settings.seq_len)
    return build_calibration(OmegaConf.create(cfg), tokenizer, settings.data_dir or None)


class HostMemory:
    """Peak resident set size of this process while a block runs, sampled every ``interval`` seconds.

    The kernel's high-water mark (``ru_maxrss``) cannot be reset, and loading a bf16 checkpoint into
    float32 already sets it, so it would hide what the method itself needs; sampling the current RSS
    measures the block alone (spikes shorter than the interval can be missed).
    """

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.peak = self.start = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> HostMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def measure(fn: Callable[[], Any], model: torch.nn.Module, warm_batch: torch.Tensor, device: torch.device) -> tuple[Any, dict]:
    """Run ``fn`` once after an untimed warm-up forward: wall seconds (device-synchronised), peak GPU
    memory allocated during ``fn``, and the process's resident set size at the start and at its peak
    during ``fn`` (plus the kernel's high-water mark, which includes loading the model)."""
    with torch.no_grad():
        model(input_ids=warm_batch.to(device), use_cache=False)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    gpu_before = torch.cuda.memory_allocated(device) / 2**20 if cuda else None
    with HostMemory() as host:
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return result, {
        "seconds": round(seconds, 4),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        "gpu_mib_before": round(gpu_before, 1) if cuda else None,
        "peak_host_rss_mib": round(host.peak / 2**20, 1),
        "host_rss_before_mib": round(host.start / 2**20, 1),
        "host_rss_high_water_mib": round(host_peak_rss_mib(), 1),
    }


def run_layerfold(settings: Settings, blocks: torch.Tensor, method_cfg: dict) -> Outcome:
    """layerfold's ``compress`` on a fresh copy of the checkpoint; scoring (capture) is inside the timing."""
    from layerfold.methods import MethodContext, compress, get_method

    get_method(method_cfg)  # imports every method module and validates the config before the clock starts
    model, tokenizer = load_model(settings)
    ctx = MethodContext(model, tokenizer, blocks, stats=None, batch_size=settings.batch_size)
    plan, measurement = measure(lambda: compress(ctx, method_cfg), model, blocks[:1], torch.device(settings.device))
    return Outcome({"plan": plan}, state_of(model), measurement)


def _is_cuda(value: Any) -> bool:
    return (isinstance(value, str) and value.startswith("cuda")) or (isinstance(value, torch.device) and value.type == "cuda")


@contextlib.contextmanager
def cuda_calls_to(device: torch.device) -> Iterator[None]:
    """Send the released code's hard-coded ``.cuda()`` / ``.to("cuda")`` to ``device`` when it is not CUDA."""
    if device.type == "cuda":
        yield
        return
    original_to, original_cuda = torch.Tensor.to, torch.Tensor.cuda

    def to(self, *args, **kwargs):
        args = tuple(device if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = device
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *args, **kwargs: original_to(self, device)
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.cuda = original_to, original_cuda


@contextlib.contextmanager
def patched(target: Any, **attributes: Any) -> Iterator[None]:
    """Set attributes on a module/class/object for the duration of the block, then restore them."""
    missing = object()
    saved = {name: getattr(target, name, missing) for name in attributes}
    for name, value in attributes.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(target, name)
            else:
                setattr(target, name, value)


@contextlib.contextmanager
def released_imports(root: Path, shadowed: Sequence[str]) -> Iterator[None]:
    """Import the released code's top-level modules (``utils``, ``metrics``, ...) from ``root`` without
    them replacing, or being replaced by, modules of the same name elsewhere: the names in ``shadowed``
    are set aside during the block and restored after it (the imported modules keep working)."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in shadowed}
    for key in saved:
        del sys.modules[key]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for key in [k for k in sys.modules if k.split(".")[0] in shadowed]:
            del sys.modules[key]
        sys.modules.update(saved)


def load_module(path: Path, name: str) -> types.ModuleType:
    """Import one released file as a module named ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Preloaded:
    """Stands in for ``AutoModelForCausalLM``/``AutoTokenizer``: ``from_pretrained`` returns the object
    already loaded from the local checkpoint, whatever hub id, dtype or device map the code asks for."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.calls: list[dict] = []

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append({"args": [str(a) for a in args], "kwargs": {k: str(v) for k, v in kwargs.items()}})
        return self.obj


class OnDevice:
    """A tokenizer whose tensors land on ``device`` (the LaCo notebook never moves its inputs)."""

    def __init__(self, tokenizer: Any, device: torch.device) -> None:
        self.tokenizer, self.device = tokenizer, device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer(*args, **kwargs).to(self.device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def _spy(fn: Callable, calls: list) -> Callable:
    """``fn`` unchanged, its arguments and result appended to ``calls``."""

    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    return wrapper
