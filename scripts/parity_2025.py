"""Parity with the released code of ReplaceMe and LinearPatch, as scripts/parity_released.py does for the seed methods.

    python scripts/parity_2025.py fetch --git-dir mts-ai/ReplaceMe=<git dir> --git-dir chenxinrui-tsinghua/LinearPatch=<git dir>
    python scripts/parity_2025.py run --checkpoint artifacts/base --blocks 32 --seq-len 128 --threads 1      # results/parity/
    python scripts/parity_2025.py run --methods linear_patch --checkpoint <stories260K HF dir> --num-remove 2 --tag stories260k

Both sides run on the same checkpoint, dtype, device and calibration blocks (the pipeline's policy), each in its
own process (its memory peaks are its own), and what they produced is compared tensor by tensor.

| method       | released code (pinned commit)                                          | layerfold side |
|--------------|------------------------------------------------------------------------|----------------|
| replaceme    | mts-ai/ReplaceMe ``distance.py`` profile_distances + ``lstsq.py`` lstsq | ``method=replaceme`` (``solver=inverse``) |
| replaceme (cosine) | the same, ``cosine_dist.py`` cosine_dist (Adam)                   | ``method.objective=cosine`` |
| linear_patch | chenxinrui-tsinghua/LinearPatch ``layer_select.py`` select_layer + ``block_scaling.py`` register_linear_patch | ``compensate=linear_patch`` (``estimate=mean_of_ratios``) on the released block |

**Adapting the released code, never editing it** (every adaptation is recorded in the result JSON):

- the model comes from the local checkpoint (``from_pretrained`` stand-ins return it; ReplaceMe's second load, in
  bfloat16, returns a bfloat16 copy of the same weights; LinearPatch gets the float16 model ``main_distill.py`` loads);
- calibration: the pipeline's token blocks through a tokenizer stand-in (ReplaceMe's ``get_calib_dataloader``
  returns them in batches; LinearPatch's loader yields one block per batch, as its ``batch_size=1``);
- hard-coded CUDA tensors and ``.to("cuda")`` go to the run device; ReplaceMe's output paths go to a temporary folder;
- two of ReplaceMe's imports that are not installed here and not on the compared path are stubbed (``termcolor.colored``
  prints plain text, ``torchmin.minimize`` raises if called: only its ``solver != adam`` path uses it).

Results: ``<out>/<method>[_<tag>].json`` (benchmark layout: environment, settings, rows with the timings, plus
``released``, ``adaptations``, ``comparisons``, ``passed``) and ``<out>/summary_2025.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import io as _io
import json
import os
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _load_base() -> types.ModuleType:
    """scripts/parity_released.py as a module: its comparison, measurement and adapter helpers are reused."""
    spec = importlib.util.spec_from_file_location("parity_released", REPO / "scripts" / "parity_released.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["parity_released"] = module
    spec.loader.exec_module(module)
    return module


base = _load_base()

import torch  # noqa: E402

from benchmarks.common import Timing, environment, row, write_result  # noqa: E402
from layerfold.io import atomic_file, read_json  # noqa: E402

ReleasedRepo, Outcome = base.ReleasedRepo, base.Outcome
RELEASED = {
    "replaceme": ReleasedRepo("mts-ai/ReplaceMe", "5bb71d99da40c8b0ba0df488589e14d77ced7fee", ("ReplaceMe", "readme.md")),
    "linear_patch": ReleasedRepo("chenxinrui-tsinghua/LinearPatch", "d1274e8782676d13f1f006cae4405db5d0f96721",
                                 ("layer_select.py", "block_scaling.py", "rotate_utils", "LICENSE", "README.md")),
}
base.RELEASED.update(RELEASED)  # the base script's fetch and --git-dir parsing then know these repositories
METHODS = tuple(RELEASED)


@dataclass
class Settings:
    """What both sides share (written to JSON for the worker processes)."""

    checkpoint: str
    device: str = "cpu"
    dtype: str = "float32"
    num_remove: int = 8
    blocks: int = 32
    seq_len: int = 128
    batch_size: int = 4
    released_dir: str = str(base.DEFAULT_RELEASED_DIR)
    threads: int | None = None
    window: list[int] | None = None  # linear_patch: the released code's block, handed to layerfold's side
    released_rotation: bool = False  # linear_patch: layerfold's side uses the released Hadamard matrix
    extra: dict[str, Any] = field(default_factory=dict)


def load_model(settings: Settings, dtype: str | None = None):
    from layerfold.models import load_checkpoint

    return load_checkpoint(settings.checkpoint, torch.device(settings.device), getattr(torch, dtype or settings.dtype))


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cuda_factories_to(device: torch.device) -> Iterator[None]:
    """``torch.zeros/ones/eye/empty(..., device="cuda")`` on ``device`` when it is not CUDA (ReplaceMe allocates its sums so)."""
    if device.type == "cuda":
        yield
        return
    originals = {name: getattr(torch, name) for name in ("zeros", "ones", "eye", "empty")}

    def redirect(factory: Callable) -> Callable:
        def call(*args, **kwargs):
            if base._is_cuda(kwargs.get("device")):
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


# --------------------------------------------------------------------------------------------
# ReplaceMe
# --------------------------------------------------------------------------------------------

REPLACEME_ADAPTATIONS = (
    "model: the local checkpoint loaded once in the run's dtype (from_pretrained stand-in); ReplaceMe's reload before "
    "folding (torch_dtype=bfloat16) gets a bfloat16 copy of the same weights",
    "calibration: get_calib_dataloader returns the pipeline's token blocks in batches of --batch-size (every block is "
    "one 'text' of max_length = block length), through a tokenizer stand-in that returns them as the padded batch",
    "torch.zeros/eye(..., device='cuda') and .to('cuda') go to the run device; distances.pth, layer_distances.csv and the "
    "output model are written into a temporary folder (the working directory during the run)",
    "termcolor.colored (plain text) and torchmin.minimize (raises: only solver != adam uses it) are stubbed where not installed",
    "torch.load reads ReplaceMe's own distances.pth (numpy floats) and transform file with weights_only=False, the default "
    "before torch 2.6 (this torch refuses numpy scalars otherwise)",
    "the cosine objective is driven as run_from_config does (select_non_overlapping_blocks on the saved distances, then "
    "cosine_dist with start_id/end_id/num_layer), with its defaults: Adam lr 1e-4, 10 epochs, batches of 1024 tokens",
)


def _replaceme_modules(settings: Settings) -> dict[str, types.ModuleType]:
    root = base.released_path(Path(settings.released_dir), "replaceme")
    stubs = {"termcolor": _stub("termcolor", colored=lambda text, *a, **k: text), "torchmin": _stub("torchmin", minimize=_unavailable)}
    with base.released_imports(root, ["ReplaceMe"]), stubbed_modules(**stubs), contextlib.redirect_stdout(_io.StringIO()):
        return {name: importlib.import_module(f"ReplaceMe.{name}") for name in ("utils", "distance", "lstsq", "cosine_dist")}


def released_replaceme(settings: Settings, blocks: torch.Tensor, objective: str = "lstsq") -> Outcome:
    device = torch.device(settings.device)
    model, _ = load_model(settings)
    modules = _replaceme_modules(settings)
    models, tokenizer = ReplaceMeModels(model), TextBlocks()
    batches = [list(blocks[i : i + settings.batch_size]) for i in range(0, blocks.shape[0], settings.batch_size)]
    common = dict(model_path=settings.checkpoint, dataset="local-blocks", dataset_column="text", batch_size=settings.batch_size,
                  max_length=blocks.shape[1], layers_to_skip=settings.num_remove, dataset_size=blocks.shape[0])
    patches = [base.patched(m, AutoModelForCausalLM=models, AutoTokenizer=base.Preloaded(tokenizer), get_calib_dataloader=lambda *a, **k: batches)
               for name, m in modules.items() if name != "utils"]
    with tempfile.TemporaryDirectory() as work:

        def run() -> str:
            with contextlib.ExitStack() as stack:
                for p in patches:
                    stack.enter_context(p)
                stack.enter_context(contextlib.chdir(work))
                stack.enter_context(base.cuda_calls_to(device))
                stack.enter_context(cuda_factories_to(device))
                stack.enter_context(own_files_unpickled())
                stack.enter_context(contextlib.redirect_stdout(_io.StringIO()))
                stack.enter_context(contextlib.redirect_stderr(_io.StringIO()))
                modules["distance"].profile_distances(**common)
                distances = str(Path(work) / "distances.pth")
                if objective == "lstsq":
                    return modules["lstsq"].lstsq(**common, save_path=str(Path(work) / "out"), save_transform_only=True,
                                                  distances_path=distances)
                blocks_chosen = modules["utils"].select_non_overlapping_blocks(torch.load(distances), settings.num_remove, num_blocks=1,
                                                                               merge_consecutive=True)
                (start, end), = blocks_chosen
                return modules["cosine_dist"].cosine_dist(**common, save_path=str(Path(work) / "out"), save_transform_only=True,
                                                          distances_path=distances, start_id=start, end_id=end, num_layer=0)

        path, measurement = base.measure(run, model, blocks[:1], device)
        from safetensors.torch import load_file

        state = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            state.update(load_file(file))
        with own_files_unpickled():
            transform = torch.load(f"{path}_transform", map_location="cpu")
            distances = [float(d) for d in torch.load(Path(work) / "distances.pth")]
        transform = transform[0] if isinstance(transform, list) else transform
    chosen = modules["utils"].select_non_overlapping_blocks(distances, settings.num_remove, num_blocks=1, merge_consecutive=True)
    state["__transform__"] = transform.double().cpu()
    record = {"distances": distances, "block": list(chosen[0]), "from_pretrained_calls": models.calls}
    return Outcome(record, state, measurement)


def layerfold_replaceme(settings: Settings, blocks: torch.Tensor, objective: str = "lstsq") -> Outcome:
    from layerfold.methods import MethodContext, compress, get_method

    cfg = {"name": "replaceme", "num_remove": settings.num_remove, "solver": "inverse", "objective": objective}
    get_method(cfg)
    model, tokenizer = load_model(settings)
    ctx = MethodContext(model, tokenizer, blocks, stats=None, batch_size=settings.batch_size, seed=42)
    plan, measurement = base.measure(lambda: compress(ctx, cfg), model, blocks[:1], torch.device(settings.device))
    fold = plan["details"]["fold_layer"]
    original = load_model(settings)[0]
    unfolded = original.model.layers[fold].mlp.down_proj.weight.detach().double().cpu()
    state = {k: v.to(torch.bfloat16) for k, v in base.state_of(model).items()}  # as the released code saves: bfloat16
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # save_pretrained (the released side's file) stores a tied head once
    state["__transform__"] = ctx.plan.inits[fold].matrix.double()
    state["__unfolded__"] = unfolded
    return Outcome({"plan": plan}, state, measurement)


def compare_replaceme(out: dict[str, Outcome], tolerance: float, objective: str = "lstsq") -> list[dict]:
    rel, lf = out["released"], out["layerfold"]
    details = lf.record["plan"]["details"]
    n = details["removed_layers"][-1] - details["removed_layers"][0] + 1
    ours = details["block_distance"][1:]  # index j = block start; the released list starts at j = 1
    released = rel.record["distances"]
    last = len(released) - 1  # the block ending at the last layer: the released code reads HF's post-norm last hidden state
    transform_rel, transform_lf = rel.state.pop("__transform__"), lf.state.pop("__transform__")
    unfolded = lf.state.pop("__unfolded__")
    weights_rel = {k: v for k, v in rel.state.items()}
    weights_lf = {k: v for k, v in lf.state.items()}
    # A block ending at the last layer: the released target is HF's post-norm last hidden state, layerfold's the pre-norm
    # stream, so the fitted maps differ by design there (a documented difference, not gated).
    ends_last = details["removed_layers"][-1] == len(released) + n - 1  # the last dense layer (L = len(released) + n)
    fold_key = f"model.layers.{details['fold_layer']}.mlp.down_proj.weight"
    scale = float(transform_rel.abs().max())
    w_bf16 = unfolded.to(torch.bfloat16).double()
    propagated = (transform_rel - transform_lf).abs().T @ w_bf16.abs()
    comparisons = [
        base.value_differences("block_distance", "mean last-token angular distance of every block of n layers ending before the last "
                               "layer (released distance.py vs layerfold's capture)", released[:last], ours[:last], 1e-4),
        base.value_differences("block_distance_last", "the block ending at the last layer: released compares HF's post-norm last hidden "
                               "state, layerfold the pre-norm residual stream", released[last:], ours[last:], 1e-4, gate=False),
        base.same_sequence("block", "removed block [start, end) (released select_non_overlapping_blocks vs layerfold)",
                           list(rel.record["block"]), [details["removed_layers"][0], details["removed_layers"][0] + n]),
    ]
    if objective == "lstsq":
        comparisons += [
            {**base.tensor_differences({"T": transform_rel}, {"T": transform_lf}, tolerance * max(scale, 1.0), name="transform", gate=not ends_last),
             "what": f"the fitted map T (float64); tolerance {tolerance} x max|T| ({scale:.3g})"
                     + ("; the block ends at the last layer, where the released target is post-norm: not gated" if ends_last else "")},
            base.tensor_differences({k: v for k, v in weights_rel.items() if k != fold_key},
                                    {k: v for k, v in weights_lf.items() if k != fold_key}, 0.0, name="weights_unchanged"),
            {**_fold_comparison(weights_rel[fold_key], (transform_lf.T @ w_bf16).to(torch.bfloat16), fold_key, propagated),
             "name": "fold_formula", "gate": True, "what": f"{fold_key}: the released fold vs layerfold's T folded by the released recipe, "
                                             "(Tᵀ @ bfloat16(W)) -> bfloat16 (the released code reloads the model in bfloat16 before folding); "
                                             "every entry within |dT|ᵀ|W| plus one bfloat16 step"},
            {**_fold_comparison(weights_rel[fold_key], weights_lf[fold_key], fold_key, propagated),
             "gate": bool(torch.equal(w_bf16, unfolded)) and not ends_last,
             "what": f"{fold_key} as each side stores it (bfloat16); layerfold folds into W in the compute dtype, so the two agree only "
                     "where the checkpoint's W is stored in bfloat16 (gate then; a float32 checkpoint differs by W's own rounding)"},
        ]
    else:
        comparisons += [
            {**base.tensor_differences({"T": transform_rel}, {"T": transform_lf}, tolerance, gate=False, name="transform"),
             "what": "the map T after Adam: the released code shuffles with the global RNG and keeps the activations in bfloat16, "
                     "layerfold with a seeded generator in the compute dtype, so the trajectories differ"},
            base.value_differences("distance_from_identity", "max |T - I| of each side (how far 10 epochs at lr 1e-4 moved T)",
                                   [float((transform_rel - torch.eye(transform_rel.shape[0], dtype=torch.float64)).abs().max())],
                                   [float((transform_lf - torch.eye(transform_lf.shape[0], dtype=torch.float64)).abs().max())], 5e-4),
            base.tensor_differences({k: v for k, v in weights_rel.items() if k != fold_key},
                                    {k: v for k, v in weights_lf.items() if k != fold_key}, 0.0, name="weights_unchanged"),
        ]
    return comparisons


def _fold_comparison(released: torch.Tensor, layerfold: torch.Tensor, key: str, propagated: torch.Tensor) -> dict:
    """The folded projection in bfloat16, each entry within what the two sides' difference in T explains plus rounding.

    ``propagated`` is ``|T_released - T_layerfold|ᵀ |W|`` (float64): how far the exact products ``Tᵀ W`` of the two sides can
    be apart; rounding each to bfloat16 adds at most one bfloat16 step of the value (half a step each).
    """
    a, b = released.double(), layerfold.double()
    step = torch.finfo(torch.bfloat16).eps * torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(torch.bfloat16).tiny)
    excess = (a - b).abs() - (propagated + step)
    return {"name": "fold_weight", "gate": True, "passed": bool(excess.max() <= 0),
            "what": f"{key} after the fold, in bfloat16: every entry within |dT|ᵀ|W| (the two sides' difference in T, propagated) "
                    "plus one bfloat16 step of the value",
            "tolerance": "|dT|ᵀ|W| + 1 bfloat16 step", "max_abs_diff": float((a - b).abs().max()), "largest_excess": float(excess.max()),
            "share_exact": float((a == b).double().mean()), "max_propagated": float(propagated.max())}


# --------------------------------------------------------------------------------------------
# LinearPatch
# --------------------------------------------------------------------------------------------

LINEAR_PATCH_ADAPTATIONS = (
    "model: the local checkpoint in float16, as main_distill.py loads it (torch_dtype=float16); layerfold's side runs the "
    "same float16 weights",
    "calibration: a loader yielding one pipeline block per batch (main_distill's batch_size 1); select_layer reads its first "
    "128 (num_samples is fixed at 128 in the released code, which divides by 128 whatever it read: give it >= 128 blocks)",
    "the released block (select_layer's cosine choice) is handed to layerfold's side, which removes the same layers and runs "
    "compensate=linear_patch (estimate=mean_of_ratios, the released per-sample average) on them",
    "the patch is read from the layer the released register_linear_patch attaches it to (linear_patch.get_weight())",
)


def released_linear_patch(settings: Settings, blocks: torch.Tensor) -> Outcome:
    device = torch.device(settings.device)
    model, _ = load_model(settings, "float16")
    root = base.released_path(Path(settings.released_dir), "linear_patch")
    with base.released_imports(root, ["rotate_utils", "layer_select", "block_scaling"]):
        layer_select = base.load_module(root / "layer_select.py", "lp_layer_select")
        block_scaling = base.load_module(root / "block_scaling.py", "lp_block_scaling")
        hadamard_utils = importlib.import_module("rotate_utils.hadamard_utils")
    loader = [(blocks[i : i + 1],) for i in range(blocks.shape[0])]

    def run() -> tuple:
        with base.cuda_calls_to(device), contextlib.redirect_stdout(_io.StringIO()), contextlib.redirect_stderr(_io.StringIO()):
            result = layer_select.select_layer(model, loader, settings.num_remove, "rotate", device)
            _, start, end, _, scale, _, _ = result
            model.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(model.model.layers) if i < start or i >= end])
            block_scaling.register_linear_patch(model, start, scale, device, rotated=True)
            return result

    (layer, start, end, similarity, scale, _, _), measurement = base.measure(run, model, blocks[:1], device)
    patch = model.model.layers[start - 1].linear_patch.get_weight()
    width = model.config.hidden_size
    state = {"patch": patch.detach().double().cpu(), "scale": scale.detach().double().cpu(),
             "rotation": hadamard_utils.get_hadamard_matrix(width, "cpu").double()}
    record = {"window": [int(start), int(end)], "similarity": float(similarity)}
    return Outcome(record, state, measurement)


def layerfold_linear_patch(settings: Settings, blocks: torch.Tensor) -> Outcome:
    from layerfold.compensate import DenseStack, check_removal_only, get_compensation, interfaces
    from layerfold.compensate import linear_patch as lp
    from layerfold.methods import MethodContext
    from layerfold.models.patches import ATTRIBUTE

    if settings.window is None:
        raise SystemExit("layerfold's linear_patch side needs the released block (settings.window); run the released side first.")
    start, end = settings.window
    model, tokenizer = load_model(settings, "float16")
    spec, cfg = get_compensation({"name": "linear_patch", "estimate": "mean_of_ratios"})
    width = model.config.hidden_size
    if settings.released_rotation:
        root = base.released_path(Path(settings.released_dir), "linear_patch")
        with base.released_imports(root, ["rotate_utils"]):
            released = importlib.import_module("rotate_utils.hadamard_utils").get_hadamard_matrix(width, "cpu").double()
        lp.hadamard = lambda n: released  # the released order-576 block, not layerfold's Paley construction

    ctx = MethodContext(model, tokenizer, blocks, stats=None, batch_size=1)

    def run() -> dict:
        dense = DenseStack(ctx)
        ctx.remove(list(range(start, end)))
        check_removal_only(ctx.plan, "fixed block", spec.name)
        with torch.no_grad():
            return spec.fn(dense, cfg, interfaces(ctx.plan))

    details, measurement = base.measure(run, model, blocks[:1], torch.device(settings.device))
    matrices = getattr(model, ATTRIBUTE).matrices()
    (position, patch), = matrices.items()
    rotation = lp.hadamard(width)
    scale = torch.diagonal(rotation.T @ patch.double() @ rotation)
    state = {"patch": patch.double().cpu(), "scale": scale.cpu(), "rotation": rotation.double().cpu()}
    return Outcome({"details": details, "position": position}, state, measurement)


def compare_linear_patch(out: dict[str, Outcome], tolerance: float) -> list[dict]:
    rel, lf = out["released"].state, out["layerfold"].state
    from layerfold.compensate.hadamard import hadamard

    own = hadamard(rel["rotation"].shape[0])
    relative = lambda a, b: float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())  # noqa: E731
    return [
        base.same_sequence("position", "where the patch acts: the kept layer after the block (released: output of layer start-1)",
                           [out["released"].record["window"][0]], [out["layerfold"].record["position"]]),
        {**base.tensor_differences({"scale": rel["scale"]}, {"scale": lf["scale"]}, 5e-3 * float(rel["scale"].abs().max()), name="scale"),
         "what": "the per-channel scale d in the rotated basis; tolerance 5e-3 x max|d|: the released code rotates and averages in float16",
         "max_relative_diff": relative(lf["scale"], rel["scale"])},
        {**base.tensor_differences({"patch": rel["patch"]}, {"patch": lf["patch"]}, 5e-3 * float(rel["patch"].abs().max()), name="patch"),
         "what": "P = H diag(d) Hᵀ as each side attaches it (float32); tolerance 5e-3 x max|P|"},
        {"name": "rotation_construction", "gate": False, "passed": bool(torch.allclose(own, rel["rotation"], atol=1e-12)),
         "tolerance": "exact", "max_abs_diff": float((own - rel["rotation"]).abs().max()),
         "what": "layerfold's own Hadamard matrix of this width vs the released one (equal for powers of two: Sylvester's; for "
                 "other widths layerfold builds a Paley block, the released code ships a table: both orthonormal Hadamard, different)"},
    ]


# --------------------------------------------------------------------------------------------
# Registry and orchestration (one process per side, as scripts/parity_released.py)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parity:
    sides: dict[str, Callable[[Settings, torch.Tensor], Outcome]]
    timed: dict[str, str]
    compare: Callable[[dict[str, Outcome], float], list[dict]]
    adaptations: tuple[str, ...]


PARITY = {
    "replaceme": Parity({"released": released_replaceme, "layerfold": layerfold_replaceme},
                        {"released": "released distance.py + lstsq.py", "layerfold": "layerfold replaceme (lstsq, solver=inverse)"},
                        compare_replaceme, REPLACEME_ADAPTATIONS),
    "replaceme_cosine": Parity({"released": lambda s, b: released_replaceme(s, b, "cosine"), "layerfold": lambda s, b: layerfold_replaceme(s, b, "cosine")},
                               {"released": "released distance.py + cosine_dist.py (Adam)", "layerfold": "layerfold replaceme (cosine)"},
                               lambda out, tol: compare_replaceme(out, tol, "cosine"), REPLACEME_ADAPTATIONS),
    "linear_patch": Parity({"released": released_linear_patch, "layerfold": layerfold_linear_patch},
                           {"released": "released select_layer + register_linear_patch", "layerfold": "layerfold compensate=linear_patch"},
                           compare_linear_patch, LINEAR_PATCH_ADAPTATIONS),
}
REPOSITORY = {"replaceme": "replaceme", "replaceme_cosine": "replaceme", "linear_patch": "linear_patch"}


def run_in_worker(method: str, side: str, settings_file: Path, blocks_file: Path, folder: Path) -> Outcome:
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--method", method, "--side", side,
           "--settings", str(settings_file), "--blocks", str(blocks_file), "--out", str(folder)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise base.SideFailed(method, side, done.stderr)
    from safetensors.torch import load_file

    state_file = folder / "state.safetensors"
    payload = read_json(folder / "outcome.json")
    return Outcome(payload["record"], load_file(state_file) if state_file.exists() else {}, payload["measurement"])


def timing_rows(method: str, measurements: dict[str, list[dict]], device: str) -> list[dict]:
    rows = []
    for side, label in PARITY[method].timed.items():
        runs = measurements.get(side, [])
        if runs:
            rows.append(row(label, timing=Timing([m["seconds"] for m in runs]), device="cpu", side=side, device_measured=device,
                            peak_host_mib=max(m["peak_host_rss_mib"] for m in runs), host_rss_before_mib=runs[0]["host_rss_before_mib"],
                            peak_gpu_mib=max((m["peak_gpu_mib"] for m in runs if m.get("peak_gpu_mib") is not None), default=None)))
    return rows


def parity_record(method: str, settings: Settings, outcomes: dict[str, Outcome], measurements: dict[str, list[dict]], tolerance: float,
                  error: base.SideFailed | None = None) -> dict:
    spec = RELEASED[REPOSITORY[method]]
    provenance = base.released_provenance(Path(settings.released_dir), REPOSITORY[method]) or {}
    comparisons = [] if error else PARITY[method].compare(outcomes, tolerance)
    record = {
        "benchmark": f"parity_2025/{method}", "environment": environment(settings.device),
        "settings": {k: v for k, v in asdict(settings).items() if k != "released_dir"} | {"checkpoint": Path(settings.checkpoint).name,
                                                                                         "tolerance": tolerance},
        "released": {"repo": spec.repo, "commit": spec.commit, "files": list(spec.paths), "obtained_from": provenance.get("obtained_from")},
        "adaptations": list(PARITY[method].adaptations),
        "passed": False if error else base.verdict(comparisons), "comparisons": comparisons,
        "records": {side: o.record for side, o in outcomes.items()},
        "rows": timing_rows(method, measurements, settings.device),
        "notes": "Each side ran in its own process on the same checkpoint and calibration blocks; seconds cover the method only "
                 "(model loading excluded) after one untimed warm-up forward; peak_host_mib is the resident set size sampled every "
                 "10 ms during the method.",
    }
    if error:
        record["error"] = {"side": error.side, "traceback": error.traceback}
    return record


def run_parity(args: argparse.Namespace) -> None:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(checkpoint=str(Path(args.checkpoint).resolve()), device=device, dtype=args.dtype, num_remove=args.num_remove,
                        blocks=args.blocks, seq_len=args.seq_len, batch_size=args.batch_size,
                        released_dir=str(Path(args.released_dir).expanduser()), threads=args.threads)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    git_dirs = base._parse_git_dirs(args.git_dir)
    for method in args.methods:
        repo = REPOSITORY[method]
        base.fetch_released(repo, Path(settings.released_dir), git_dirs.get(RELEASED[repo].repo))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.checkpoint)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            count = max(settings.blocks, 128) if method == "linear_patch" else settings.blocks
            blocks, _ = base.calibration_blocks(base.Settings(checkpoint=settings.checkpoint, blocks=count, seq_len=settings.seq_len,
                                                              data_dir=args.data_dir), tokenizer)
            blocks_file = Path(scratch) / f"{method}-blocks.pt"
            torch.save(blocks, blocks_file)
            outcomes, measurements, error = {}, {}, None
            try:
                for side in PARITY[method].sides:
                    if method == "linear_patch" and side == "layerfold":
                        settings.window = outcomes["released"].record["window"]
                        width = int(settings.extra["width"])
                        settings.released_rotation = (width & (width - 1)) != 0  # not a power of two: layerfold's block differs
                    settings_file = Path(scratch) / f"{method}-{side}.json"
                    settings_file.write_text(json.dumps(asdict(settings)), encoding="utf-8")
                    for r in range(args.repeats):
                        print(f"[parity] {method}/{side} run {r + 1}/{args.repeats}", flush=True)
                        outcome = run_in_worker(method, side, settings_file, blocks_file, Path(scratch) / method / f"{side}-{r}")
                        measurements.setdefault(side, []).append(outcome.measurement)
                        outcomes[side] = outcome
                    if method == "linear_patch" and side == "released":
                        settings.extra["width"] = int(outcomes["released"].state["rotation"].shape[0])
            except base.SideFailed as err:
                error = err
            record = parity_record(method, settings, outcomes, measurements, args.tolerance, error)
            record["settings"]["blocks"] = count
            name = f"{method}_{args.tag}" if args.tag else method
            write_result(out / f"{name}.json", record)
            print(f"[parity] {name}: {'PASS' if record['passed'] else 'FAIL'}", flush=True)
            settings.window, settings.released_rotation = None, False
    write_summary(out)


def write_summary(out: Path) -> None:
    """``<out>/summary_2025.md`` from every parity_2025 JSON there."""
    lines = ["# Parity with the released code: ReplaceMe and LinearPatch", "",
             "Generated by `scripts/parity_2025.py`; one JSON per run beside this file, every comparison saying what it compared. "
             "Rows with gate `no` are documented differences and do not decide the verdict.", ""]
    for file in sorted(out.glob("*.json")):
        rec = read_json(file)
        if not str(rec.get("benchmark", "")).startswith("parity_2025/"):
            continue
        s, env = rec["settings"], rec["environment"]
        lines += [f"## {file.stem}: {'PASS' if rec['passed'] else 'FAIL'}", "",
                  f"{rec['released']['repo']} @ `{rec['released']['commit'][:12]}`; {s['checkpoint']}, {s['dtype']} on {env['device']}, "
                  f"{s['blocks']} x {s['seq_len']} calibration tokens, num_remove {s['num_remove']}.", ""]
        if "error" in rec:
            lines += [f"The {rec['error']['side']} side failed (traceback in {file.name}).", ""]
        lines += ["| comparison | gate | result | max abs diff | tolerance |", "|---|---|---|---|---|"]
        for c in rec["comparisons"]:
            diff, gate = c.get("max_abs_diff"), c.get("gate", True)
            result = "pass" if c["passed"] else ("FAIL" if gate else "differs (documented)")
            lines.append(f"| {c['name']} | {'yes' if gate else 'no'} | {result} | {'' if diff is None else f'{diff:.3g}'} | {c.get('tolerance', 'exact')} |")
        lines += ["", "| implementation | seconds | peak host RSS MiB |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['seconds']:.2f} | {r['peak_host_mib']:.0f} |" for r in rec["rows"]]
        lines.append("")
    with atomic_file(out / "summary_2025.md") as handle:
        handle.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="copy the pinned released files into --released-dir")
    run = commands.add_parser("run", help="fetch if needed, run both sides, compare, write results")
    for p in (fetch, run):
        p.add_argument("--methods", nargs="+", choices=list(PARITY), default=list(PARITY))
        p.add_argument("--released-dir", default=str(base.DEFAULT_RELEASED_DIR))
        p.add_argument("--git-dir", action="append", default=[], metavar="OWNER/NAME=PATH")
    run.add_argument("--checkpoint", default="artifacts/base")
    run.add_argument("--device", default="auto")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--num-remove", type=int, default=8)
    run.add_argument("--blocks", type=int, default=32, help="calibration blocks (linear_patch reads at least 128)")
    run.add_argument("--seq-len", type=int, default=128)
    run.add_argument("--batch-size", type=int, default=4)
    run.add_argument("--data-dir", default=os.environ.get("LAYERFOLD_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--repeats", type=int, default=1)
    run.add_argument("--tolerance", type=float, default=1e-6, help="relative tolerance of the fitted map T (x max|T|)")
    run.add_argument("--tag", default="", help="suffix of the result files (e.g. the model)")
    run.add_argument("--out", default="results/parity")
    worker = commands.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--method", choices=list(PARITY), required=True)
    worker.add_argument("--side", required=True)
    worker.add_argument("--settings", type=Path, required=True)
    worker.add_argument("--blocks", type=Path, required=True)
    worker.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "fetch":
        git_dirs = base._parse_git_dirs(args.git_dir)
        for method in args.methods:
            repo = REPOSITORY[method]
            record = base.fetch_released(repo, Path(args.released_dir), git_dirs.get(RELEASED[repo].repo))
            print(f"{method}: {record['repo']} @ {record['commit']}")
    elif args.command == "run":
        run_parity(args)
    else:
        settings = Settings(**json.loads(args.settings.read_text(encoding="utf-8")))
        if settings.threads:
            torch.set_num_threads(settings.threads)
        base.write_outcome(PARITY[args.method].sides[args.side](settings, torch.load(args.blocks)), args.out)


if __name__ == "__main__":
    from layerfold.io import install_error_hook

    install_error_hook("parity_2025")  # layerfold's errors (a bad override, a missing file) as one line; --debug: the traceback
    main()
