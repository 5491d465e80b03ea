"""Parity with the papers' released code: run it and layerfold's parity mode on the same model and data.

For each method whose released implementation runs on a Hugging Face Llama on one device, this runs
the released code (unmodified, from a directory outside this repository) and layerfold's parity
preset on the same checkpoint, dtype, device and calibration data, then compares what they chose
and the weights they produced, tensor by tensor, and times both side by side (wall seconds, peak
GPU memory, peak host RSS; each implementation in its own process, so the high-water marks are its own).

    python scripts/parity_released.py fetch [--git-dir yangyifei729/LaCo=/path/to/its/git ...]  # else git clone
    python scripts/parity_released.py run --blocks 32 --seq-len 128 --threads 1 --repeats 2   # CPU (results/parity/)
    python scripts/parity_released.py run --device cuda --out results/parity/gpu              # GPU, pipeline-size calibration
    python scripts/parity_released.py summary --out results/parity                            # rewrite summary.md

``run`` fetches what is missing first (network clone of the pinned commit; without network, ``fetch
--git-dir`` from a local copy, or ``--released-dir`` pointing at a folder that already has it).

| method   | released code (pinned commit)                       | layerfold side                               |
|----------|-----------------------------------------------------|----------------------------------------------|
| laco     | yangyifei729/LaCo ``laco_llama-13b.ipynb`` cells     | ``+experiment=laco_code_parity``             |
| shortgpt | icip-cas/ShortGPT ``shortgpt/shortgpt.py``           | ``method=shortgpt``                          |
| mka      | SempraETY/Pruning-via-Merging ``pipeline.py`` main() | ``+experiment=mka_code_released`` (its output) and ``mka_code_parity`` (its intent) |
| come     | WangFei-2019/CoMe ``methods/concat_merge.py`` main_func | ``+experiment=come_code_parity``          |
| come_p   | WangFei-2019/CoMe ``methods/concat_merge_P.py`` main_func | ``+experiment=come_p_code_parity``      |
| streamline | RUCKBReasoning/LLM-Streamline ``get_cosine.py`` + ``train_mseloss.replace_lightweight_network`` | ``+experiment=streamline_code_parity`` |

LLM-Streamline is checked up to training: its window selection (``get_cosine_similarity``) and the
pruned model it writes around the (untrained) replacement layer initialised from the window's first
layer, against ``method=streamline`` with ``replacement=transformer_layer``; its training is the
recovery engine's (departures in ``docs/recovery.md``). SLEB is not checked here.

**Adapting the released code, never editing it.** Only input/output is changed, by monkeypatching or a
thin driver, and every adaptation is recorded in the result JSON (``adaptations``):

- models come from the local checkpoint in the run's dtype and device (the released code loads from
  the hub, in float16/bfloat16/float32 as each chose, with ``device_map="auto"``);
- calibration is layerfold's token blocks (the same tensor for both sides), handed over where the
  released code reads its dataset; MKA keeps its own MMLU-test calibration, read from the local files;
- hard-coded ``.cuda()``/``.to("cuda")`` go to the run device on a machine without CUDA, and
  hard-coded output paths go to a temporary folder; CoMe's checkpoint write is skipped (layerfold's
  side writes none either), MKA's ``torch.save`` of its state dict is kept because it is its result;
- on CPU, MKA's ``L`` identical forward passes per prompt are memoised (same outputs, a fraction of
  the time; ``--mka-memoise``), which makes its CPU timing an underestimate;
- CoMe's patched modeling file (transformers ~4.45) does not build under this transformers; its
  extra outputs (``heads_embed``, ``mlp_embed``) are produced by hooks that call the file's own
  ``L1_Correlation`` on the stock model's ``o_proj``/``down_proj`` inputs, reshaped as the file does.

Every comparison has a tolerance and a verdict; those marked ``gate: false`` record a documented,
deliberate difference (e.g. layerfold reads the pre-norm residual stream where HF's last
``hidden_states`` entry is post-norm) and do not decide the method's verdict. Results:
``<out>/<method>.json`` (benchmark layout: environment, settings, rows with the timings, plus
``released``, ``adaptations``, ``comparisons``, ``passed``) and ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import importlib.util
import io as _io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ (shared timing and result helpers) beside scripts/

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import Timing, environment, row, write_result  # noqa: E402
from layerfold.io import atomic_dir, atomic_file, read_json  # noqa: E402
from layerfold.models.devices import host_peak_rss_mib  # noqa: E402

DEFAULT_RELEASED_DIR = Path("~/.cache/layerfold/released")
METHODS = ("laco", "shortgpt", "mka", "come", "come_p", "streamline")


# --------------------------------------------------------------------------------------------
# The released repositories: which commit, which files
# --------------------------------------------------------------------------------------------


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
                    f"`parity_released.py fetch --git-dir {spec.repo}=<path to its git directory>`, or point "
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


# --------------------------------------------------------------------------------------------
# Comparisons: pure functions with a tolerance and a verdict
# --------------------------------------------------------------------------------------------


def tensor_differences(released: Mapping[str, torch.Tensor], layerfold: Mapping[str, torch.Tensor], tolerance: float,
                       name: str = "weights", gate: bool = True) -> dict:
    """Max abs difference per tensor of two state dicts; passes when both hold the same names and
    shapes and every difference is within ``tolerance`` (a NaN difference never passes)."""
    per_tensor: dict[str, float] = {}
    only_released = sorted(set(released) - set(layerfold))
    only_layerfold = sorted(set(layerfold) - set(released))
    shape_mismatch = []
    for key in sorted(set(released) & set(layerfold)):
        a, b = released[key], layerfold[key]
        if tuple(a.shape) != tuple(b.shape):
            shape_mismatch.append({"tensor": key, "released": list(a.shape), "layerfold": list(b.shape)})
            continue
        diff = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
        per_tensor[key] = float(diff.max()) if diff.numel() else 0.0
    worst_key = max(per_tensor, key=lambda k: (math.isnan(per_tensor[k]), per_tensor[k]), default=None)
    worst = per_tensor[worst_key] if worst_key is not None else 0.0
    passed = (not only_released and not only_layerfold and not shape_mismatch and bool(per_tensor)
              and all(v <= tolerance for v in per_tensor.values()))
    return {
        "name": name, "what": "max |released - layerfold| of every tensor of the resulting state dict",
        "gate": gate, "passed": passed, "tolerance": tolerance, "max_abs_diff": worst, "worst_tensor": worst_key,
        "tensors_compared": len(per_tensor), "only_in_released": only_released, "only_in_layerfold": only_layerfold,
        "shape_mismatch": shape_mismatch, "per_tensor_max_abs_diff": {k: float(f"{v:.3g}") for k, v in per_tensor.items()},
    }


def same_sequence(name: str, what: str, released: Sequence, layerfold: Sequence, gate: bool = True) -> dict:
    """Exact equality of two decisions (chosen layers, merge windows, accept/reject)."""
    released, layerfold = _plain(released), _plain(layerfold)
    return {"name": name, "what": what, "gate": gate, "passed": released == layerfold, "released": released, "layerfold": layerfold}


def value_differences(name: str, what: str, released: Sequence[float], layerfold: Sequence[float], tolerance: float,
                      gate: bool = True) -> dict:
    """Max abs difference of two equally long lists of scores; a length mismatch or NaN fails."""
    out = {"name": name, "what": what, "gate": gate, "tolerance": tolerance,
           "released": [_num(v) for v in released], "layerfold": [_num(v) for v in layerfold]}
    if len(released) != len(layerfold):
        return {**out, "passed": False, "max_abs_diff": None, "note": f"lengths differ: {len(released)} vs {len(layerfold)}"}
    diffs = [abs(float(a) - float(b)) for a, b in zip(released, layerfold)]
    worst = max(diffs, default=0.0)
    return {**out, "passed": all(d <= tolerance for d in diffs), "max_abs_diff": worst}


def verdict(comparisons: Sequence[dict]) -> bool:
    """A method passes when every gating comparison passes (and there is at least one)."""
    gating = [c for c in comparisons if c.get("gate", True)]
    return bool(gating) and all(c["passed"] for c in gating)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, torch.Tensor)) and np.ndim(value) == 0:
        return int(value)
    return value


def _num(value: Any) -> float | None:
    value = float(value)
    return None if not math.isfinite(value) else float(f"{value:.8g}")


# --------------------------------------------------------------------------------------------
# One run: settings, model, data, measurement
# --------------------------------------------------------------------------------------------


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


def load_model(settings: Settings):
    """The checkpoint in the run's dtype on the run's device (the same call for both sides)."""
    from layerfold.models import load_checkpoint

    return load_checkpoint(settings.checkpoint, torch.device(settings.device), getattr(torch, settings.dtype))


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


# --------------------------------------------------------------------------------------------
# Adapters: input/output around the released code, never inside its algorithms
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# LaCo: the notebook's cells
# --------------------------------------------------------------------------------------------

LACO_NOTEBOOK = "laco_llama-13b.ipynb"
LACO_PRESET = ["+experiment=laco_code_parity"]


def notebook_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]


def released_laco(settings: Settings, blocks: torch.Tensor) -> Outcome:
    """The notebook's cells in order; the model, tokenizer and hyperparameter cells are replaced by the
    local model, its tokenizer and layerfold's parity settings. The merge function, similarity and the
    loop run verbatim."""
    cfg = settings.method_config(LACO_PRESET + settings.overrides.get("laco", []))
    cells = notebook_cells(released_path(Path(settings.released_dir), "laco") / LACO_NOTEBOOK)
    device = torch.device(settings.device)
    model, tokenizer = load_model(settings)
    layers = model.config.num_hidden_layers
    hyper = {"INTERVAL": cfg["interval"], "MERGE_LAYERS": cfg["merge_layers"], "LOWEST_LAY": cfg["lowest_layer"],
             "HIGHEST_LAY": layers - 1 if cfg["highest_layer"] is None else cfg["highest_layer"], "THRESHOLD": cfg["threshold"]}
    namespace: dict[str, Any] = {"__name__": "laco_notebook"}
    replaced = {"model": False, "tokenizer": False, "hyper": False}
    procedure: list[str] = []
    for cell in cells:
        if "AutoModelForCausalLM.from_pretrained" in cell:
            namespace["llama_13B"], replaced["model"] = model, True
        elif "AutoTokenizer.from_pretrained" in cell:
            namespace["tokenizer"], replaced["tokenizer"] = (OnDevice(tokenizer, device) if device.type == "cuda" else tokenizer), True
        elif "MERGE_LAYERS =" in cell:
            namespace.update(hyper)
            replaced["hyper"] = True
        elif not replaced["hyper"]:
            exec(compile(cell, LACO_NOTEBOOK, "exec"), namespace)  # the imports cell
        else:
            procedure.append(cell)
    if not all(replaced.values()) or not any("while lay >= LOWEST_LAY" in c for c in procedure):
        raise RuntimeError(f"{LACO_NOTEBOOK} does not have the expected cells (replaced: {replaced}); was the file changed?")

    merges, similarities = [], []

    def run_cells() -> None:
        with contextlib.redirect_stdout(_io.StringIO()):
            for cell in procedure:
                exec(compile(cell, LACO_NOTEBOOK, "exec"), namespace)
                for name, calls in (("merge_layers_return_model", merges), ("cal_last_hidden_sim", similarities)):
                    if name in namespace and not getattr(namespace[name], "spied", False):
                        namespace[name] = _spy(namespace[name], calls)
                        namespace[name].spied = True

    _, measurement = measure(run_cells, model, blocks[:1], device)
    compressed = namespace["llama_13B_copy_to_compress"]
    sizes = [len(args[0].model.layers) for args, _, _ in merges] + [len(compressed.model.layers)]
    trials = [
        {"base": args[1], "layers_before": sizes[i], "folded": sizes[i] - len(result.model.layers),
         "similarity": float(sim), "accepted": sizes[i + 1] < sizes[i]}
        for i, ((args, _, result), (_, _, sim)) in enumerate(zip(merges, similarities))
    ]
    sentences = namespace["sents"]
    record = {
        "trials": trials, "final_layers": len(compressed.model.layers), "settings": hyper, "sentences": sentences,
        "sentence_ids": [tokenizer(s)["input_ids"] for s in sentences],
    }
    return Outcome(record, state_of(compressed), measurement)


def layerfold_laco(settings: Settings, blocks: torch.Tensor) -> Outcome:
    """``laco_code_parity``, plus the token ids its sentences become (to compare with the notebook's)."""
    from transformers import AutoTokenizer

    from layerfold.methods.laco import tokenize_sentences

    cfg = settings.method_config(LACO_PRESET + settings.overrides.get("laco", []))
    outcome = run_layerfold(settings, blocks, cfg)
    tokenizer = AutoTokenizer.from_pretrained(settings.checkpoint)
    outcome.record["sentence_ids"] = [t.tolist() for t in tokenize_sentences(tokenizer, cfg["sentences"], cfg["add_bos"])]
    outcome.record["sentences"] = cfg["sentences"]
    return outcome


def compare_laco(out: dict[str, Outcome], tolerance: float) -> list[dict]:
    rel, lf = out["released"].record, out["layerfold"].record
    details = lf["plan"]["details"]
    decisions = [[t["base"], t["folded"], t["accepted"]] for t in rel["trials"]], [[t["base"], t["folded"], t["accepted"]] for t in details["trials"]]
    # Trials see the same model on both sides up to and including the first one decided differently.
    same_model = next((i + 1 for i, (a, b) in enumerate(zip(*decisions)) if a != b), min(map(len, decisions)))
    return [
        same_sequence("sentences", "calibration sentences (notebook's en_wiki_selected vs conf/method/laco.yaml)",
                      rel["sentences"], lf["sentences"]),
        same_sequence("sentence_token_ids", "token ids fed to the model (notebook: tokenizer defaults; layerfold: add_bos)",
                      rel["sentence_ids"], lf["sentence_ids"]),
        same_sequence("trials", "every trial's (base layer, layers folded, accepted), in order", *decisions),
        value_differences("similarity", f"LaCo acceptance similarity of the trials run on the same model on both sides "
                          f"(the first {same_model}: up to the first decided differently)",
                          [t["similarity"] for t in rel["trials"][:same_model]],
                          [t["similarity"] for t in details["trials"][:same_model]], tolerance=1e-4),
        same_sequence("final_layers", "depth of the result", [rel["final_layers"]], [details["final_layers"]]),
        tensor_differences(out["released"].state, out["layerfold"].state, tolerance),
    ]


# --------------------------------------------------------------------------------------------
# ShortGPT: the official class, fed the calibration blocks one per call (its run script's batch 1)
# --------------------------------------------------------------------------------------------


class BlockTokenizer:
    """Stands in for ShortGPT's tokenizer: a "prompt" is already a token block; returns it as the
    padded batch the real tokenizer would (no padding needed: every block has the same length)."""

    def __init__(self, eos_token: str | None) -> None:
        self.eos_token = eos_token
        self.pad_token = eos_token

    def __call__(self, prompts: Sequence[torch.Tensor], **kwargs: Any) -> types.SimpleNamespace:
        ids = torch.stack(list(prompts))
        return types.SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


def released_shortgpt(settings: Settings, blocks: torch.Tensor) -> Outcome:
    root = released_path(Path(settings.released_dir), "shortgpt") / "shortgpt"
    device = torch.device(settings.device)
    model, tokenizer = load_model(settings)
    with released_imports(root, ["shortgpt", "metrics"]):
        module = load_module(root / "shortgpt.py", "shortgpt")
    with patched(module, AutoTokenizer=Preloaded(BlockTokenizer(tokenizer.eos_token)), AutoModelForCausalLM=Preloaded(model)):
        short = module.ShortGPT(model_name=settings.checkpoint, layers_path="model.layers", n_prune_layers=settings.num_remove)

    def run() -> list[int]:
        with cuda_calls_to(device):
            for block in blocks:  # run_shortgpt.py: DataLoader(batch_size=1), eval_importance per document
                short.eval_importance(prompts=[block], stride=blocks.shape[1], max_gen_len=0)
        removed = short.remove_layers()
        for layer_idx, module_ in enumerate(short.layers):  # run_shortgpt.py, after remove_layers()
            module_.self_attn.layer_idx = layer_idx
        return removed

    removed, measurement = measure(run, model, blocks[:1], device)
    record = {"importances_sum": [float(v) for v in short.importances], "tokens": int(blocks.numel()), "removed": sorted(removed)}
    return Outcome(record, state_of(model), measurement)


def compare_shortgpt(out: dict[str, Outcome], tolerance: float) -> list[dict]:
    rel, lf = out["released"].record, out["layerfold"].record["plan"]["details"]
    official = [v / rel["tokens"] for v in rel["importances_sum"]]  # sum over tokens -> mean, layerfold's scale
    ours = lf["block_influence"]
    return [
        value_differences("block_influence", "BI of layers 0..L-2 (sum over tokens / tokens)", official[:-1], ours[:-1], 1e-4),
        value_differences("block_influence_last_layer",
                          "BI of the last layer: official compares with HF's post-norm hidden_states[-1], layerfold with the "
                          "pre-norm residual stream (documented in methods/shortgpt.py)", official[-1:], ours[-1:], 1e-4, gate=False),
        same_sequence("removed_layers", "layers removed", rel["removed"], lf["removed_layers"]),
        tensor_differences(out["released"].state, out["layerfold"].state, tolerance),
    ]


# --------------------------------------------------------------------------------------------
# MKA: pipeline.py main() end to end, and its scoring on layerfold's features
# --------------------------------------------------------------------------------------------

MKA_CLUSTER_PREFIX = "/data/yangzhao/point/EMNLP2024/layer_fus/al"  # pipeline.py's hard-coded output root
MKA_PRESETS = {"layerfold": ["+experiment=mka_code_released"], "layerfold_parity": ["+experiment=mka_code_parity"]}


class RedirectedOs(types.ModuleType):
    """``os`` for pipeline.py, with its hard-coded cluster output root mapped to a local folder."""

    def __init__(self, prefix: str, target: Path) -> None:
        super().__init__("os")
        self.__dict__.update({k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        path = types.ModuleType("os.path")
        path.__dict__.update({k: getattr(os.path, k) for k in dir(os.path) if not k.startswith("__")})

        def join(first, *rest):
            first = str(first)
            if first.startswith(prefix):
                first = str(target) + first[len(prefix):]
            return os.path.join(first, *rest)

        path.join = join
        self.path = path


def memoised_forward(model: torch.nn.Module) -> Callable:
    """The model's forward, returning the previous outputs when called again with the same inputs:
    pipeline.py runs one identical forward per layer index for every prompt."""
    forward = model.forward
    last: dict[str, Any] = {}

    def content(value: Any) -> Any:
        if isinstance(value, torch.Tensor):  # by value: a new prompt's tensor may reuse a freed address
            return (tuple(value.shape), str(value.dtype), value.detach().cpu().numpy().tobytes())
        return value

    def cached(*args, **kwargs):
        key = (tuple(content(a) for a in args), tuple(sorted((k, content(v)) for k, v in kwargs.items())))
        if last.get("key") != key:
            last.update(key=key, outputs=forward(*args, **kwargs))
        return last["outputs"]

    return cached


def released_mka(settings: Settings, blocks: torch.Tensor) -> Outcome:
    """pipeline.py ``main()`` with its defaults (57 MMLU test prompts, 1 per subject, seed 1) and
    ``--num_layer k``; its saved state dict is the result. Spies record its similarity matrix, fusion
    ratios and the fused tensors it computes (and assigns into a throwaway ``state_dict()`` dict)."""
    device = torch.device(settings.device)
    module = load_module(released_path(Path(settings.released_dir), "mka") / "pipeline.py", "mka_pipeline")
    model, tokenizer = load_model(settings)
    layers = list(model.model.layers)  # the original layer modules, for the fusion check afterwards
    similarity_calls, ratio_calls, fused = [], [], []
    if settings.mka_memoise and device.type != "cuda":
        model.forward = memoised_forward(model)
    mmlu = Path(settings.data_dir) / "mmlu"
    with tempfile.TemporaryDirectory() as work:
        argv = ["pipeline.py", "--model_path", settings.checkpoint, "--data_dir", str(mmlu), "--num_layer", str(settings.num_remove)]

        def run() -> None:
            with patched(sys, argv=argv), cuda_calls_to(device), contextlib.redirect_stdout(_io.StringIO()), \
                    patched(module, AutoModelForCausalLM=Preloaded(model), os=RedirectedOs(MKA_CLUSTER_PREFIX, Path(work)),
                            compute_similarity_matrix_npib_global=_spy(module.compute_similarity_matrix_npib_global, similarity_calls),
                            compute_fusion_ratios=_spy(module.compute_fusion_ratios, ratio_calls),
                            layer_fusion=recording_assignments(module.layer_fusion, fused)), \
                    contextlib.redirect_stderr(_io.StringIO()):
                module.main()

        _, measurement = measure(run, model, blocks[:1], device)
        saved = next(Path(work).rglob("pytorch_model.bin"))
        state = torch.load(saved, map_location="cpu", weights_only=True)
    similarity = similarity_calls[0][2]
    record = {
        "pairs": [list(args[1][0]) for args, _, _ in ratio_calls],
        "alphas": [float(result[0][0]) for _, _, result in ratio_calls],
        "similarity": similarity.tolist(),
        "fusion": fusion_check(fused, ratio_calls, layers),
    }
    return Outcome(record, {k: v.to("cpu", copy=True) for k, v in state.items()}, measurement)  # untie shared tensors


def recording_assignments(layer_fusion: Callable, fused: list) -> Callable:
    """``layer_fusion`` unchanged, except that what it assigns into ``model.state_dict()`` is also
    recorded in ``fused``, one list per call (the dict is a fresh copy, so the assignment itself changes nothing)."""

    class Recording(dict):
        def __setitem__(self, key, value):
            fused[-1].append((key, value.detach().to("cpu", copy=True)))
            super().__setitem__(key, value)

    def wrapper(model, *args, **kwargs):
        fused.append([])  # one list per call, i.e. per merge step
        original = model.state_dict
        model.state_dict = lambda *a, **k: Recording(original(*a, **k))
        try:
            return layer_fusion(model, *args, **kwargs)
        finally:
            del model.state_dict

    return wrapper


def fusion_check(fused: list, ratio_calls: list, layers: Sequence[torch.nn.Module]) -> dict:
    """layerfold's alpha-merge (``surgery.weighted`` on the linear weights its adapter names) against
    the fused tensors pipeline.py computed, step by step, with pipeline.py's own alphas."""
    from layerfold.models.adapters import get_adapter
    from layerfold.surgery import weighted

    linears = {f"{name}.weight" for name in get_adapter("llama").linears}
    worst, names_match, steps = 0.0, len(fused) == len(ratio_calls), []
    for entries, (args, _, result) in zip(fused, ratio_calls):
        (l, m), alpha = args[1][0], float(result[0][0])
        names = {key.split(f"model.layers.{l}.", 1)[1] for key, _ in entries}
        names_match &= names == linears
        for key, tensor in entries:
            name = key.split(f"model.layers.{l}.", 1)[1]
            base = layers[l].get_parameter(name).detach().float().cpu()
            other = layers[m].get_parameter(name).detach().float().cpu()
            ours = weighted(alpha)(base, [other]).to(tensor.dtype)
            worst = max(worst, float((ours.double() - tensor.double()).abs().max()))
        steps.append({"pair": [int(l), int(m)], "alpha": alpha, "tensors": sorted(names)})
    return {"max_abs_diff": worst, "names_match": names_match, "steps": steps}


def mka_scoring(settings: Settings, blocks: torch.Tensor) -> Outcome:
    """pipeline.py's scoring functions and layerfold's on the *same* features: layerfold's per-sample
    layer outputs of the calibration blocks (not timed; this isolates the arithmetic)."""
    from layerfold.capture import capture_statistics
    from layerfold.methods.mka import MKAConfig, layer_similarity
    from layerfold.methods.mka import merge_alpha

    cfg = settings.method_config(MKA_PRESETS["layerfold_parity"] + settings.overrides.get("mka", []))
    module = load_module(released_path(Path(settings.released_dir), "mka") / "pipeline.py", "mka_pipeline")
    model, _ = load_model(settings)
    with torch.no_grad():
        features = capture_statistics(model, blocks, settings.batch_size, desc=None).sample_features[1:].double().numpy()
    ours = layer_similarity(features, MKAConfig(**cfg))["raw"]
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(_io.StringIO()):
        module.set_seed(1)
        for l, f in enumerate(features):
            y = module.diffusionKernel(f.astype(np.float32), sigmaK=cfg["sigma"], alpha=cfg["kernel_alpha"], d=cfg["manifold_dim"],
                                       total_size=f.shape[0])
            with open(Path(folder) / f"layer_{l}_embedded.pkl", "wb") as handle:
                pickle.dump(y, handle)
        embeddings = module.load_embeddings(folder)
        theirs = module.compute_similarity_matrix_npib_global(embeddings, n_neighbors=cfg["n_neighbors"], k_entropy=cfg["k_entropy"])
    n = features.shape[0]
    pairs = [(l - 1, l) for l in range(n - 1, n - 1 - settings.num_remove, -1)]  # the last-pair schedule, original indices
    record = {
        "similarity_released": theirs.tolist(), "similarity_layerfold": ours.tolist(), "pairs": [list(p) for p in pairs],
        "alpha_released_fn": [float(module.compute_fusion_ratios(theirs, [p])[0][0]) for p in pairs],  # on its own S
        "alpha_layerfold_fn": [merge_alpha(theirs, l, m, "code") for l, m in pairs],  # layerfold's formula, same S
        "alpha_layerfold_similarity": [merge_alpha(ours, l, m, "code") for l, m in pairs],  # layerfold's formula and S
    }
    return Outcome(record, {}, {})


def compare_mka(out: dict[str, Outcome], tolerance: float) -> list[dict]:
    rel, lf, parity = out["released"].record, out["layerfold"].record["plan"]["details"], out["layerfold_parity"].record["plan"]["details"]
    score = out["scoring"].record
    fusion = rel["fusion"]
    sim_rel, sim_lf = np.array(score["similarity_released"]), np.array(score["similarity_layerfold"])
    finite = np.isfinite(sim_rel) & np.isfinite(sim_lf)
    return [
        same_sequence("pairs", "merged pair (positions) of every step: released vs mka_code_released",
                      rel["pairs"], [s["pair"] for s in lf["steps"]]),
        same_sequence("pairs_parity", "merged pair (positions) of every step: released vs mka_code_parity",
                      rel["pairs"], [s["pair"] for s in parity["steps"]]),
        tensor_differences(out["released"].state, out["layerfold"].state, tolerance, name="weights_released_output"),
        {"name": "fusion_arithmetic", "gate": True,
         "what": "layerfold's alpha-merge of the step's layers with pipeline.py's alpha vs the fused tensors pipeline.py "
                 "computes (and never writes), every step; and the same weight names fused",
         "passed": fusion["names_match"] and fusion["max_abs_diff"] <= tolerance, "tolerance": tolerance,
         "max_abs_diff": fusion["max_abs_diff"], "steps": fusion["steps"]},
        value_differences("alpha_function", "compute_fusion_ratios vs layerfold merge_alpha(code), same similarity matrix",
                          score["alpha_released_fn"], score["alpha_layerfold_fn"], 1e-12),
        value_differences("alpha_same_features",
                          "alpha of the schedule's pairs from pipeline.py's scoring vs layerfold's, on the same features "
                          "(differences: layerfold symmetrises MI(i,j)/MI(j,i), fp64 centred kernel, seeded jitter)",
                          score["alpha_released_fn"], score["alpha_layerfold_similarity"], 1e-3, gate=False),
        {"name": "similarity_same_features", "gate": False, "passed": bool(finite.all()), "tolerance": "finite",
         "what": "raw NPIB matrix, pipeline.py vs layerfold (guard none, similarity_norm none) on the same features",
         "max_abs_diff": float(np.abs(sim_rel - sim_lf)[finite].max()) if finite.any() else None,
         "median_abs_diff": float(np.median(np.abs(sim_rel - sim_lf)[finite])) if finite.any() else None,
         "non_finite_released": int((~np.isfinite(sim_rel)).sum()), "non_finite_layerfold": int((~np.isfinite(sim_lf)).sum())},
        value_differences("alpha_own_data", "alpha per step: pipeline.py on its MMLU prompts vs mka_code_parity on the calibration "
                          "blocks (different features by design)", rel["alphas"], [s["alpha"] for s in parity["steps"]], 1e-3, gate=False),
    ]


# --------------------------------------------------------------------------------------------
# CoMe: methods/concat_merge.py main_func on the stock model, scores through hooks
# --------------------------------------------------------------------------------------------

COME_PRESET = ["+experiment=come_code_parity"]
COME_P_PRESET = ["+experiment=come_p_code_parity"]
COME_RELEASED = {"come": ("concat_merge", COME_PRESET), "come_p": ("concat_merge_P", COME_P_PRESET)}
# concat_merge_P.main_func records the step's ratio before its search assigns it: on the first step this line
# raises UnboundLocalError (so the released CoMe-P never completes a step), later it would record the previous
# step's ratio. It is the one line taken out before the module runs; the ratio is read from the trials instead.
COME_P_UNBOUND = '        concat_merge_info[phase_name]["merge_ratio"] = ratio\n'


def released_module_without(path: Path, name: str, line: str) -> types.ModuleType:
    """Import the released file ``path`` as module ``name`` with the one source line ``line`` left out (checked
    to occur exactly once); everything else runs as written."""
    source = path.read_text(encoding="utf-8")
    if source.count(line) != 1:
        raise RuntimeError(f"{path}: expected the line {line.strip()!r} exactly once; the released file changed.")
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source.replace(line, ""), str(path), "exec"), module.__dict__)
    return module


class ScoredModel:
    """The stock model answering the patched modeling file's extra outputs: ``heads_embed`` and
    ``mlp_embed`` per layer, computed by the file's ``L1_Correlation`` on the inputs of ``o_proj`` and
    ``down_proj`` and reshaped as its attention does. Everything else is the stock model."""

    def __init__(self, model: torch.nn.Module, l1_correlation: Callable) -> None:
        self.__dict__.update(model=model, l1_correlation=l1_correlation)

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "l1_correlation"):  # not set yet (copy/pickle probing a fresh instance)
            raise AttributeError(name)
        return getattr(self.model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.model, name, value)

    def __deepcopy__(self, memo: dict) -> ScoredModel:
        """A copy around a deep copy of the model (concat_merge_P deep-copies its model handler for every trial)."""
        import copy

        return ScoredModel(copy.deepcopy(self.model, memo), self.l1_correlation)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False, output_mlp_embed=False,
                 output_heads_embed=False, **kwargs):
        config, heads, mlp, handles = self.model.config, [], [], []
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        groups = config.num_attention_heads // config.num_key_value_heads
        for layer in self.model.model.layers:
            if output_heads_embed:
                def attn_hook(module, args):
                    b, s, _ = args[0].shape
                    embed = self.l1_correlation(args[0], module.weight).view(b, s, config.num_attention_heads, head_dim)
                    heads.append(embed.view(b, s, config.num_key_value_heads, groups, head_dim))
                handles.append(layer.self_attn.o_proj.register_forward_pre_hook(attn_hook))
            if output_mlp_embed:
                handles.append(layer.mlp.down_proj.register_forward_pre_hook(
                    lambda module, args: mlp.append(self.l1_correlation(args[0], module.weight))))
        try:
            out = self.model(input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return types.SimpleNamespace(logits=out.logits, hidden_states=out.hidden_states,
                                     heads_embed=tuple(heads) or None, mlp_embed=tuple(mlp) or None)


def released_come(settings: Settings, blocks: torch.Tensor, method: str = "come") -> Outcome:
    """main.py's sequence (get_args, set_seed, model handler, main_func) with the handler built on the
    stock model and the calibration loader returning the blocks; its flags (``--merge-item``, ``--psu``,
    ``--min-max``, ``--wo-repeat`` as the README runs it; ``--granularity`` for CoMe-P) follow layerfold's preset."""
    root = released_path(Path(settings.released_dir), method)
    module_name, preset = COME_RELEASED[method]
    cfg = settings.method_config(preset + [f"method.num_remove={settings.num_remove}"] + settings.overrides.get(method, []))
    device = torch.device(settings.device)
    model, tokenizer = load_model(settings)
    import transformers

    with released_imports(root, ["utils", "methods", "models_unit"]), contextlib.redirect_stdout(_io.StringIO()):
        util = importlib.import_module("utils.util")
        model_utils = importlib.import_module("utils.model_utils")
        concat_merge = (released_module_without(root / "methods" / f"{module_name}.py", f"methods.{module_name}", COME_P_UNBOUND)
                        if method == "come_p" else importlib.import_module(f"methods.{module_name}"))
        arguments = importlib.import_module("utils.arguments_utils")
        modeling = importlib.import_module("models_unit.llama.modeling_llama")
    with tempfile.TemporaryDirectory() as work:
        target = model.config.num_hidden_layers - settings.num_remove
        argv = ["main.py", "--method", module_name, "--model-name", settings.checkpoint, "--target-layers", str(target),
                "--save-path", work, "--merge-item", str(cfg["merge_layers"])] + (["--wo-repeat"] if cfg["wo_repeat"] else [])
        argv += (["--granularity", str(cfg["granularity"])] if method == "come_p"
                 else ["--psu", str(int(cfg["psu"])), "--min-max", str(cfg["min_max"])])
        with patched(sys, argv=argv):
            args = arguments.get_args()
        util.set_seed(args.seed)
        with patched(transformers.LlamaForCausalLM, from_pretrained=Preloaded(model).from_pretrained), \
                patched(model_utils, AutoTokenizer=Preloaded(tokenizer)):
            handler = model_utils.ModelHandler(model_name=args.model_name, device_map=settings.device, merge_method=False)
        handler.model = ScoredModel(model, modeling.L1_Correlation)
        handler.model.seqlen = blocks.shape[1]  # get_llmhander sets 2048; the blocks set the length here
        handler.save = lambda path: None  # a full checkpoint write; layerfold's side writes none either
        loader = types.SimpleNamespace(input_ids=blocks.reshape(1, -1), attention_mask=torch.ones(1, blocks.numel(), dtype=torch.long))

        trials: list = []  # CoMe-P: (args, kwargs, summed loss) of every trial merge, in the order of its grid

        def run() -> None:
            with patched(concat_merge, get_trainloaders=lambda *a, **k: loader, get_loss=_spy(concat_merge.get_loss, trials)):
                concat_merge.main_func(args, handler)

        _, measurement = measure(run, model, blocks[:1], device)
        info = read_json(next(Path(work).glob("*_info.json")))
    phases = [v for k, v in info.items() if isinstance(v, dict) and "merge_list" in v]
    if method == "come_p":  # the ratio each step merged with: the first minimum of its trial losses (min over the grid)
        grid = np.arange(0, 1 + 1 / cfg["granularity"], 1 / cfg["granularity"])
        losses = [loss / blocks.numel() for _, _, loss in trials]  # get_loss sums batch means x block tokens
        for k, phase in enumerate(phases):
            step = losses[k * len(grid) : (k + 1) * len(grid)]
            r = float(grid[step.index(min(step))])
            phase.update(merge_ratio=[r, 1 - r], trial_losses=step)
    record = {
        "steps": [{"merge_list": p["merge_list"], "ratio": p["merge_ratio"], "layer_importance": p["layer_importance"],
                   "layer_importance_skip": [None if not math.isfinite(v) else v for v in p["layer_importance_skip"]],
                   **({"trial_losses": p["trial_losses"]} if "trial_losses" in p else {})}
                  for p in phases],
        "merge_info": info["merge_info"][-1], "tokens": int(blocks.numel()), "sequences": int(blocks.shape[0]),
        "skip_tokens": cfg["skip_tokens"],
    }
    return Outcome(record, state_of(model), measurement)


def _flat(item: Any) -> list[int]:
    return [x for sub in item for x in _flat(sub)] if isinstance(item, list) else [item]


def compare_come(out: dict[str, Outcome], tolerance: float) -> list[dict]:
    rel, plan = out["released"].record, out["layerfold"].record["plan"]
    details, method = plan["details"], plan["method"]
    steps = details["steps"]
    scores: dict[str, list[float]] = {k: [] for k in ("bi", "bi_lf", "bi_top", "bi_top_lf", "skip", "skip_lf", "skip_top", "skip_top_lf")}
    admissible: dict[str, list[list[int]]] = {"released": [], "layerfold": []}
    skip_count = rel["tokens"] if rel.get("skip_tokens") == "all" else rel["sequences"]  # CoMe-P: every token; CoMe: the last
    for theirs, ours in zip(rel["steps"], steps):
        # Released: sums / number of entries; layerfold: sums / tokens (BI) and / sequences or tokens (skip). The top
        # boundary (output of the last layer) is HF's post-norm hidden state there and, unless top_boundary=final_norm,
        # the pre-norm residual stream here, so the last layer's BI and the last window's skip score are compared apart.
        layers, windows = len(theirs["layer_importance"]), len(theirs["layer_importance_skip"])
        bi = [v * layers / rel["tokens"] for v in theirs["layer_importance"]]
        skip = [None if v is None else v * windows / skip_count for v in theirs["layer_importance_skip"]]
        scores["bi"] += bi[:-1]
        scores["bi_lf"] += ours["block_influence"][:-1]
        scores["bi_top"] += bi[-1:]
        scores["bi_top_lf"] += ours["block_influence"][-1:]
        admissible["released"].append([i for i, v in enumerate(skip) if v is not None])
        admissible["layerfold"].append([i for i, v in enumerate(ours["skip_score"]) if v is not None])
        for i, (a, b) in enumerate(zip(skip, ours["skip_score"])):
            if a is not None and b is not None:  # scored on both sides (wo_repeat excludes windows with inf)
                key = "skip_top" if i == layers - 2 else "skip"  # the window of 2 layers ending at the last layer
                scores[key].append(a)
                scores[f"{key}_lf"].append(b)
    final_norm = method.get("top_boundary") == "final_norm"
    top_note = ("the top boundary: HF's post-norm hidden_states[-1] in the released code; in layerfold "
                + ("the same (top_boundary=final_norm)" if final_norm else
                   "the pre-norm residual stream (top_boundary=pre_norm: documented departure in methods/come.py)"))
    released_rule = method.get("wo_repeat_rule") == "released" or not method.get("wo_repeat", True)
    return [
        same_sequence("merge_windows", "layers concatenated at every step (positions)",
                      [s["merge_list"] for s in rel["steps"]], [s["positions"] for s in steps]),
        value_differences("ratios", "shares of every step (Block Influence for CoMe, calibration-loss search for CoMe-P)",
                          [r for s in rel["steps"] for r in s["ratio"]], [r for s in steps for r in s["ratio"]], 1e-6),
        value_differences("block_influence", "clamped BI per layer at every step, last layer excluded", scores["bi"], scores["bi_lf"], 1e-4),
        value_differences("block_influence_last_layer", f"clamped BI of the last layer at every step; {top_note}",
                          scores["bi_top"], scores["bi_top_lf"], 1e-4, gate=final_norm),
        same_sequence("admissible_windows", "windows wo_repeat leaves open at every step ("
                      + ("wo_repeat_rule=released: the released rule" if released_rule else
                         "layerfold also closes windows after which the target can no longer be reached: documented departure") + ")",
                      admissible["released"], admissible["layerfold"], gate=released_rule),
        value_differences("skip_score", "angular skip score of every admissible window (last token for CoMe, every token for "
                          "CoMe-P), the window ending at the last layer excluded", scores["skip"], scores["skip_lf"], 1e-4),
        value_differences("skip_score_last_window", f"skip score of the window ending at the last layer at every step; {top_note}",
                          scores["skip_top"], scores["skip_top_lf"], 1e-4, gate=final_norm),
        same_sequence("merge_info", "original layers behind every final layer",
                      [_flat(g) for g in rel["merge_info"]], details["merge_info"]),
        tensor_differences(out["released"].state, out["layerfold"].state, tolerance),
    ] + ([value_differences("posterior_losses", "CoMe-P: mean calibration loss of every trial ratio at every step (plan.json keeps "
                            "6 decimals)", [v for s in rel["steps"] for v in s["trial_losses"]],
                            [t["loss"] for s in steps for t in s.get("trials", [])], 1e-5)]
         if any("trial_losses" in s for s in rel["steps"]) else [])


# --------------------------------------------------------------------------------------------
# LLM-Streamline: get_cosine.py's window and train_mseloss.py's pruned model (before training)
# --------------------------------------------------------------------------------------------

STREAMLINE_PRESET = ["+experiment=streamline_code_parity", "method.replacement=transformer_layer"]


def released_streamline(settings: Settings, blocks: torch.Tensor) -> Outcome:
    """``get_cosine_similarity`` on the blocks (window of ``num_remove + 1`` layers, as
    ``lightweight_model_train`` calls it), then ``replace_lightweight_network`` with the layer
    ``init_layer`` builds from the chosen window's first layer, untrained: the pruned model the MSE
    path would write had training left the layer as it started."""
    root = released_path(Path(settings.released_dir), "streamline")
    device = torch.device(settings.device)
    model, _ = load_model(settings)
    import transformers

    width, layers = settings.num_remove + 1, model.config.num_hidden_layers
    with released_imports(root, ["LLM_Streamline", "args"]), contextlib.redirect_stdout(_io.StringIO()):
        get_cosine = importlib.import_module("LLM_Streamline.get_cosine")
        lightweight = importlib.import_module("LLM_Streamline.train_lightweightnetwork")
        entry = importlib.import_module("LLM_Streamline.train_mseloss")  # what mseloss_entry.py runs
    similarities: list = []
    dataset = [{"input_ids": block.tolist()} for block in blocks] + [{"input_ids": []}]  # the code asserts len > num_data

    def run() -> tuple[int, Any]:
        with patched(get_cosine, generate_unique_index=lambda start, end, length: list(range(length)),
                     average_similarity=_spy(get_cosine.average_similarity, similarities)), \
                contextlib.redirect_stdout(_io.StringIO()):
            best = get_cosine.get_cosine_similarity(model, dataset, blocks.shape[0], device, width, layers)
            model.to(device)  # the code moves the model to the CPU when it is done
            config = copy.deepcopy(model.config)
            layer = lightweight.init_layer("llama_layer", config, device, model, best, width)
            config.num_hidden_layers = layers - settings.num_remove
            pruned = transformers.AutoModelForCausalLM.from_config(config).to(device)
            name = "llama-" + Path(settings.checkpoint).name  # the code picks the architecture by name
            return best, entry.replace_lightweight_network(model, layer, pruned, best, width, name, layers)

    (best, pruned), measurement = measure(run, model, blocks[:1], device)
    record = {"window_start": best, "window_scores": [result for _, _, result in similarities], "width": width}
    return Outcome(record, state_of(pruned), measurement)


def compare_streamline(out: dict[str, Outcome], tolerance: float) -> list[dict]:
    rel, plan = out["released"].record, out["layerfold"].record["plan"]
    details, method = plan["details"], plan["method"]
    final_norm = method.get("top_boundary") == "final_norm"
    ours = details["window_scores"]
    note = ("the window ending at the last layer, against HF's post-norm hidden_states[-1] in the released code; in layerfold "
            + ("the same (top_boundary=final_norm)" if final_norm else "the pre-norm residual stream (top_boundary=pre_norm)"))
    return [
        same_sequence("window", "first layer of the chosen window", [rel["window_start"]], [details["window"][0]]),
        value_differences("window_scores", "0.5 + 0.5 mean token cosine across every window but the last (plan.json keeps 6 decimals)",
                          rel["window_scores"][:-1], ours[:-1], 1e-5),
        value_differences("window_score_last", f"score of {note}", rel["window_scores"][-1:], ours[-1:], 1e-5, gate=final_norm),
        tensor_differences(out["released"].state, out["layerfold"].state, tolerance),
    ]


# --------------------------------------------------------------------------------------------
# Registry: sides per method, what each adapts, how they compare
# --------------------------------------------------------------------------------------------


def layerfold_side(method: str, preset: list[str]) -> Callable[[Settings, torch.Tensor], Outcome]:
    """layerfold's side of ``method``: ``preset`` plus the run's ``num_remove`` and the method's overrides."""

    def side(settings: Settings, blocks: torch.Tensor) -> Outcome:
        overrides = preset + [f"method.num_remove={settings.num_remove}"] + settings.overrides.get(method, [])
        return run_layerfold(settings, blocks, settings.method_config(overrides))

    return side


@dataclass(frozen=True)
class Parity:
    sides: dict[str, Callable[[Settings, torch.Tensor], Outcome]]
    timed: dict[str, str]  # side -> label of its timing row
    compare: Callable[[dict[str, Outcome], float], list[dict]]
    adaptations: tuple[str, ...]


COMMON_ADAPTATIONS = (
    "model: loaded once from the local checkpoint with layerfold's loader, in the run's dtype and device, and handed to the "
    "released code where it calls from_pretrained (same weights on both sides)",
    "hard-coded .cuda() / .to('cuda') calls go to the run device when it is not CUDA",
)

COME_ADAPTATIONS = COMMON_ADAPTATIONS + (
    "main.py's sequence: get_args (--method concat_merge --target-layers L-k; --merge-item, --psu, --min-max and "
    "--wo-repeat from the preset; defaults otherwise), "
    "set_seed, ModelHandler, main_func; ModelHandler is built with merge_method=False on the stock model because "
    "models_unit/llama/modeling_llama.py (transformers ~4.45) does not build under this transformers",
    "the patched file's extra outputs come from hooks: heads_embed = L1_Correlation(o_proj input, o_proj.weight) "
    "viewed (b, s, kv_heads, groups, head_dim), mlp_embed = L1_Correlation(down_proj input, down_proj.weight), "
    "with the file's own L1_Correlation",
    "calibration: get_trainloaders returns the pipeline's blocks flattened to one row (model.seqlen = block length), "
    "instead of 256 shuffled WikiText-2 rows from the hub",
    "ModelHandler.save (a full checkpoint write) is skipped; the importance tensors and the info JSON are still written",
)

PARITY: dict[str, Parity] = {
    "laco": Parity(
        sides={"released": released_laco, "layerfold": layerfold_laco},
        timed={"released": "released notebook loop", "layerfold": "layerfold laco_code_parity"},
        compare=compare_laco,
        adaptations=COMMON_ADAPTATIONS + (
            "notebook cells 2-4 (model path, tokenizer, hyperparameters) replaced by the local model, its tokenizer and "
            "layerfold's preset values (MERGE_LAYERS=merge_layers, INTERVAL=interval, HIGHEST_LAY=highest_layer or L-1, "
            "LOWEST_LAY=lowest_layer, THRESHOLD=threshold); every other cell runs verbatim in order",
            "on CUDA the tokenizer's tensors are moved to the device (the notebook runs the model where it was loaded)",
            "the notebook's print output is discarded; trials are read by wrapping merge_layers_return_model and "
            "cal_last_hidden_sim (arguments and results recorded, behaviour unchanged)",
        ),
    ),
    "shortgpt": Parity(
        sides={"released": released_shortgpt,
               "layerfold": layerfold_side("shortgpt", ["method=shortgpt"])},
        timed={"released": "official ShortGPT (eval_importance + remove_layers)", "layerfold": "layerfold shortgpt"},
        compare=compare_shortgpt,
        adaptations=COMMON_ADAPTATIONS + (
            "the official class loads float16 with device_map=auto; here the run's dtype (float32 by default)",
            "calibration: the pipeline's token blocks instead of PG19 books; each block is one eval_importance call "
            "(run_shortgpt.py's DataLoader batch 1, stride = block length), through a tokenizer stand-in that returns the block",
        ),
    ),
    "mka": Parity(
        sides={"released": released_mka,
               "layerfold": layerfold_side("mka", MKA_PRESETS["layerfold"]),
               "layerfold_parity": layerfold_side("mka", MKA_PRESETS["layerfold_parity"]),
               "scoring": mka_scoring},
        timed={"released": "released pipeline.py main()", "layerfold": "layerfold mka_code_released",
               "layerfold_parity": "layerfold mka_code_parity"},
        compare=compare_mka,
        adaptations=COMMON_ADAPTATIONS + (
            "pipeline.py main() runs with its own defaults and --num_layer k; --data_dir is the local MMLU copy "
            "(its test split, as the code reads it), --model_path the local checkpoint (from_pretrained returns the loaded model; "
            "the code would pick bfloat16 when supported)",
            "its hard-coded output root /data/yangzhao/... is mapped to a temporary folder; its saved pytorch_model.bin is the result",
            "spies record compute_similarity_matrix_npib_global, compute_fusion_ratios and the tensors layer_fusion assigns "
            "into model.state_dict() (a fresh dict, which is why nothing is written)",
            "on CPU (--mka-memoise) the model forward is memoised: pipeline.py repeats the same forward once per layer index "
            "for every prompt; outputs are identical, CPU wall time is therefore an underestimate",
            "scoring check: pipeline.py's diffusionKernel, load_embeddings (pickles in a temporary folder), "
            "compute_similarity_matrix_npib_global and compute_fusion_ratios run on layerfold's per-sample layer outputs "
            "with the preset's sigma, kernel_alpha, manifold_dim, n_neighbors and k_entropy",
        ),
    ),
    "come": Parity(
        sides={"released": released_come,
               "layerfold": layerfold_side("come", COME_PRESET)},
        timed={"released": "released concat_merge main_func", "layerfold": "layerfold come_code_parity"},
        compare=compare_come,
        adaptations=COME_ADAPTATIONS,
    ),
    "come_p": Parity(
        sides={"released": lambda settings, blocks: released_come(settings, blocks, "come_p"),
               "layerfold": layerfold_side("come_p", COME_P_PRESET)},
        timed={"released": "released concat_merge_P main_func", "layerfold": "layerfold come_p_code_parity"},
        compare=compare_come,
        adaptations=COME_ADAPTATIONS + (
            "--method concat_merge_P with --granularity from the preset (no --psu / --min-max: CoMe-P has none); the model "
            "handler's deep copy per trial copies the stock model inside the hook wrapper",
            "one line of concat_merge_P.py is left out when it is imported (the file itself is untouched): "
            "concat_merge_info[phase_name]['merge_ratio'] = ratio, which reads ratio before the ratio search assigns it and "
            "raises UnboundLocalError on the first step; each step's ratio is read from its trial losses instead (get_loss "
            "wrapped, behaviour unchanged: the first minimum over np.arange(0, 1 + 1/g, 1/g), as the code's min() picks)",
        ),
    ),
    "streamline": Parity(
        sides={"released": released_streamline,
               "layerfold": layerfold_side("streamline", STREAMLINE_PRESET)},
        timed={"released": "released get_cosine_similarity + replace_lightweight_network",
               "layerfold": "layerfold streamline_code_parity (transformer_layer)"},
        compare=compare_streamline,
        adaptations=COMMON_ADAPTATIONS + (
            "get_cosine_similarity reads every calibration block once, in order (generate_unique_index returns 0..n-1; the code "
            "draws cosine_num_data=50 random rows of SlimPajama), each block one 'dataset' row; one empty row is appended "
            "because the code asserts more rows than it reads",
            "its per-window similarities are read by wrapping average_similarity (behaviour unchanged)",
            "the pruned model: init_layer('llama_layer') from the chosen window's first layer, untrained, written by "
            "replace_lightweight_network into AutoModelForCausalLM.from_config(config with L - num_remove layers); the "
            "model name passed is 'llama-<checkpoint>' (the code dispatches on the name)",
        ),
    ),
}


# --------------------------------------------------------------------------------------------
# Orchestration: one process per side and repeat, then compare and write
# --------------------------------------------------------------------------------------------


def run_side(method: str, side: str, settings: Settings, blocks: torch.Tensor) -> Outcome:
    """One side of one method in this process (the worker entry point, and what tests call)."""
    return PARITY[method].sides[side](settings, blocks)


class SideFailed(RuntimeError):
    """One side of a comparison exited with an error; carries the end of its traceback."""

    def __init__(self, method: str, side: str, stderr: str) -> None:
        lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
        self.method, self.side, self.traceback = method, side, "\n".join(lines[-25:])
        super().__init__(f"{method}/{side} failed:\n{self.traceback}")


def run_in_worker(method: str, side: str, settings_file: Path, blocks_file: Path, folder: Path) -> Outcome:
    """``run_side`` in a fresh process, so its peak memory is its own; reads back what it wrote."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--method", method, "--side", side,
           "--settings", str(settings_file), "--blocks", str(blocks_file), "--out", str(folder)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SideFailed(method, side, done.stderr)
    from safetensors.torch import load_file

    state_file = folder / "state.safetensors"
    state = load_file(state_file) if state_file.exists() else {}
    payload = read_json(folder / "outcome.json")
    return Outcome(payload["record"], state, payload["measurement"])


def write_outcome(outcome: Outcome, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if outcome.state:
        save_file({k: v.contiguous() for k, v in outcome.state.items()}, str(folder / "state.safetensors"))
    with atomic_file(folder / "outcome.json") as handle:
        json.dump({"record": outcome.record, "measurement": outcome.measurement}, handle, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def timing_rows(method: str, measurements: dict[str, list[dict]], device: str, weights_mib: float) -> list[dict]:
    """One benchmark row per timed side: median seconds over the repeats and the worst peaks seen."""
    rows = []
    for side, label in PARITY[method].timed.items():
        runs = measurements.get(side, [])
        if not runs:
            continue
        gpu = [m["peak_gpu_mib"] for m in runs if m.get("peak_gpu_mib") is not None]
        rows.append(row(
            label, timing=Timing([m["seconds"] for m in runs]), device="cpu",  # peaks below come from the worker
            side=side, device_measured=device, peak_gpu_mib=max(gpu) if gpu else None,
            peak_gpu_over_weights=round(max(gpu) / weights_mib, 3) if gpu else None,
            gpu_mib_before=runs[0].get("gpu_mib_before"), peak_host_mib=max(m["peak_host_rss_mib"] for m in runs),
            host_rss_before_mib=runs[0]["host_rss_before_mib"],
            host_rss_high_water_mib=max(m["host_rss_high_water_mib"] for m in runs),
        ))
    return rows


def parity_record(method: str, settings: Settings, outcomes: dict[str, Outcome], measurements: dict[str, list[dict]],
                  tolerance: float, weights_mib: float) -> dict:
    spec = RELEASED[method]
    comparisons = PARITY[method].compare(outcomes, tolerance)
    provenance = released_provenance(Path(settings.released_dir), method) or {}
    return {
        "benchmark": f"parity_released/{method}",
        "environment": environment(settings.device),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("released_dir", "data_dir")} | {
            "checkpoint": Path(settings.checkpoint).name, "weight_tolerance": tolerance, "repeats": len(next(iter(measurements.values()), []))},
        "released": {"repo": spec.repo, "commit": spec.commit, "files": list(spec.paths), "obtained_from": provenance.get("obtained_from")},
        "adaptations": list(PARITY[method].adaptations),
        "passed": verdict(comparisons),
        "comparisons": comparisons,
        "rows": timing_rows(method, measurements, settings.device, weights_mib),
        "notes": "Each side ran in its own process on the same checkpoint, dtype, device and calibration blocks; seconds cover "
                 "the method only (scoring included, model loading excluded) after one untimed warm-up forward; "
                 "peak_gpu_mib is torch.cuda.max_memory_allocated during the method (gpu_mib_before: allocated when it "
                 "started); peak_host_mib is the process's resident set size sampled every 10 ms during the method "
                 "(host_rss_before_mib: when it started; host_rss_high_water_mib: the kernel's high-water mark, model loading included).",
    }


def failure_record(method: str, settings: Settings, err: SideFailed, measurements: dict[str, list[dict]], weights_mib: float) -> dict:
    """The method's JSON when one side could not finish: no comparison, the error, what was measured."""
    spec = RELEASED[method]
    return {
        "benchmark": f"parity_released/{method}", "environment": environment(settings.device),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("released_dir", "data_dir")} | {"checkpoint": Path(settings.checkpoint).name},
        "released": {"repo": spec.repo, "commit": spec.commit, "files": list(spec.paths)},
        "adaptations": list(PARITY[method].adaptations), "passed": False, "comparisons": [],
        "error": {"side": err.side, "traceback": err.traceback},
        "rows": timing_rows(method, measurements, settings.device, weights_mib),
        "notes": f"The {err.side} side exited with an error, so nothing was compared; see error.traceback.",
    }


def summary_markdown(records: dict[str, dict]) -> str:
    lines = ["# Parity with the released code", "",
             "Generated by `scripts/parity_released.py`; one JSON per method beside this file, where every comparison says "
             "what it compared (`what`). Rows with gate `no` are documented, deliberate differences and do not decide the "
             "verdict. Seconds: median over the repeats; peak host RSS sampled during the method.", ""]
    for method, rec in records.items():
        env, s = rec["environment"], rec["settings"]
        lines += [f"## {method}: {'PASS' if rec['passed'] else 'FAIL'}", ""]
        if "error" in rec:
            last = rec["error"]["traceback"].splitlines()[-1] if rec["error"]["traceback"] else ""
            lines += [f"The {rec['error']['side']} side failed: `{last}` (traceback in {method}.json).", ""]
        lines += [
                  f"{rec['released']['repo']} @ `{rec['released']['commit'][:12]}`; {s['checkpoint']}, {s['dtype']} on "
                  f"{env['device']}, {s['blocks']} x {s['seq_len']} calibration tokens"
                  + (" (LaCo reads its 5 sentences; its depth follows the threshold)" if method == "laco" else f", num_remove {s['num_remove']}")
                  + (f"; layerfold overrides {s['overrides'][method]}" if s.get("overrides", {}).get(method) else "") + ".", "",
                  "| comparison | gate | result | max abs diff | tolerance |", "|---|---|---|---|---|"]
        for c in rec["comparisons"]:
            diff, gate = c.get("max_abs_diff"), c.get("gate", True)
            result = "pass" if c["passed"] else ("FAIL" if gate else "differs (documented)")
            lines.append(f"| {c['name']} | {'yes' if gate else 'no'} | {result} | "
                         f"{'' if diff is None else f'{diff:.3g}'} | {c.get('tolerance', 'exact')} |")
        lines += ["", "| implementation | seconds | peak GPU MiB | peak host RSS MiB |", "|---|---|---|---|"]
        for r in rec["rows"]:
            lines.append(f"| {r['name']} | {r['seconds']:.2f} | {r['peak_gpu_mib'] if r['peak_gpu_mib'] is not None else '-'} | "
                         f"{r['peak_host_mib']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run_parity(args: argparse.Namespace) -> None:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(
        checkpoint=str(Path(args.checkpoint).resolve()), device=device, dtype=args.dtype, num_remove=args.num_remove,
        blocks=args.blocks, seq_len=args.seq_len, batch_size=args.batch_size, released_dir=str(Path(args.released_dir).expanduser()),
        data_dir=str(Path(os.path.expandvars(args.data_dir)).expanduser()), mka_memoise=args.mka_memoise,
        threads=args.threads, overrides=_parse_overrides(args.override),
    )
    if settings.threads:
        torch.set_num_threads(settings.threads)  # recorded by environment() in the device name
    try:
        for method in args.methods:
            fetch_released(method, Path(settings.released_dir), _parse_git_dirs(args.git_dir).get(RELEASED[method].repo))
    except ReleasedCodeMissing as err:
        raise SystemExit(str(err)) from None
    from transformers import AutoTokenizer

    if not (Path(settings.checkpoint) / "config.json").is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no config.json there; give an HF checkpoint directory "
                         "(the pipeline's artifacts/base is built by `dvc repro base`).")
    tokenizer = AutoTokenizer.from_pretrained(settings.checkpoint)
    blocks, _ = calibration_blocks(settings, tokenizer)
    weights_mib = parameter_mib(Path(settings.checkpoint), getattr(torch, settings.dtype))
    out = Path(args.out)
    records = {}
    with tempfile.TemporaryDirectory() as scratch:
        settings_file, blocks_file = Path(scratch) / "settings.json", Path(scratch) / "blocks.pt"
        settings_file.write_text(json.dumps(asdict(settings)), encoding="utf-8")
        torch.save(blocks, blocks_file)
        for method in args.methods:
            outcomes, measurements = {}, {}
            try:
                for side in PARITY[method].sides:
                    repeats = args.repeats if side in PARITY[method].timed else 1
                    for r in range(repeats):
                        folder = Path(scratch) / method / f"{side}-{r}"
                        print(f"[parity] {method}/{side} run {r + 1}/{repeats}", flush=True)
                        outcome = run_in_worker(method, side, settings_file, blocks_file, folder)
                        measurements.setdefault(side, []).append(outcome.measurement)
                        outcomes[side] = outcome
                        shutil.rmtree(folder)
            except SideFailed as err:  # a side that crashes is a result too (e.g. a bug in the released code)
                records[method] = failure_record(method, settings, err, measurements, weights_mib)
            else:
                records[method] = parity_record(method, settings, outcomes, measurements, args.tolerance, weights_mib)
            write_result(out / f"{method}.json", records[method])
            del outcomes
    write_summary(out)


def write_summary(out: Path) -> None:
    """``<out>/summary.md`` from every ``<out>/<method>.json`` present."""
    with atomic_file(out / "summary.md") as handle:
        handle.write(summary_markdown({m: read_json(out / f"{m}.json") for m in METHODS if (out / f"{m}.json").exists()}))


def parameter_mib(checkpoint: Path, dtype: torch.dtype) -> float:
    """Size of the checkpoint's tensors in ``dtype`` (the denominator of peak GPU memory over weights)."""
    from safetensors import safe_open

    numel = 0
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            numel += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return numel * torch.empty((), dtype=dtype).element_size() / 2**20


def _parse_overrides(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or method not in METHODS or "=" not in override:
            raise SystemExit(f"--override '{item}': expected METHOD:KEY=VALUE with METHOD one of {list(METHODS)}, "
                             "e.g. laco:method.add_bos=false.")
        out.setdefault(method, []).append(override)
    return out


def _parse_git_dirs(items: Sequence[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        repo, sep, path = item.partition("=")
        known = [spec.repo for spec in RELEASED.values()]
        if not sep or repo not in known:
            raise SystemExit(f"--git-dir '{item}': expected OWNER/NAME=PATH with OWNER/NAME one of {known}.")
        out[repo] = Path(path).expanduser()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    fetch = commands.add_parser("fetch", help="copy the pinned released files into --released-dir")
    run = commands.add_parser("run", help="fetch if needed, run both sides of every method, compare, write results")
    for p in (fetch, run):
        p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
        p.add_argument("--released-dir", default=str(DEFAULT_RELEASED_DIR), help="outside this repository (default %(default)s)")
        p.add_argument("--git-dir", action="append", default=[], metavar="OWNER/NAME=PATH",
                       help="a local git copy of a released repository, used instead of cloning over the network")
    run.add_argument("--checkpoint", default="artifacts/base", help="HF checkpoint directory (default %(default)s)")
    run.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--num-remove", type=int, default=8, help="layers fewer at the end (shortgpt, mka, come)")
    run.add_argument("--blocks", type=int, default=32, help="calibration blocks (pipeline default 32)")
    run.add_argument("--seq-len", type=int, default=256, help="calibration block length (pipeline default 256)")
    run.add_argument("--batch-size", type=int, default=4, help="layerfold's capture batch (pipeline default 4)")
    run.add_argument("--data-dir", default=os.environ.get("LAYERFOLD_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    run.add_argument("--mka-memoise", action=argparse.BooleanOptionalAction, default=None,
                     help="memoise MKA's repeated forwards (default: on for CPU, off for CUDA)")
    run.add_argument("--override", action="append", default=[], metavar="METHOD:KEY=VALUE",
                     help="extra conf override for layerfold's side, e.g. laco:method.add_bos=false")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads in every process (default: torch's)")
    run.add_argument("--repeats", type=int, default=1, help="timed runs per side, each in a fresh process (median reported)")
    run.add_argument("--tolerance", type=float, default=1e-6, help="max abs weight difference that still passes")
    run.add_argument("--out", default="results/parity")

    summary = commands.add_parser("summary", help="rewrite <out>/summary.md from the JSON files there")
    summary.add_argument("--out", default="results/parity")

    worker = commands.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--method", choices=METHODS, required=True)
    worker.add_argument("--side", required=True)
    worker.add_argument("--settings", type=Path, required=True)
    worker.add_argument("--blocks", type=Path, required=True)
    worker.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    if args.command == "fetch":
        git_dirs = _parse_git_dirs(args.git_dir)
        for method in args.methods:
            try:
                record = fetch_released(method, Path(args.released_dir), git_dirs.get(RELEASED[method].repo))
            except ReleasedCodeMissing as err:
                raise SystemExit(str(err)) from None
            print(f"{method}: {record['repo']} @ {record['commit']} in {released_path(Path(args.released_dir), method)}")
    elif args.command == "summary":
        write_summary(Path(args.out))
    elif args.command == "run":
        if args.mka_memoise is None:
            args.mka_memoise = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
        run_parity(args)
    else:
        settings = Settings(**json.loads(args.settings.read_text(encoding="utf-8")))
        if settings.threads:
            torch.set_num_threads(settings.threads)
        write_outcome(run_side(args.method, args.side, settings, torch.load(args.blocks, weights_only=True)), args.out)


if __name__ == "__main__":
    from layerfold.io import install_error_hook

    install_error_hook("parity_released")  # layerfold's errors (a bad override, a missing file) as one line; --debug: the traceback
    main()
