"""LinearPatch (chenxinrui-tsinghua/LinearPatch): layer_select.py + block_scaling.py, against compensate=linear_patch."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io as _io
from pathlib import Path

import torch

from parity.adapters_2025 import Settings
from parity.compare import same_sequence, tensor_differences
from parity.released import released_path
from parity.runner import Outcome, cuda_calls_to, load_model, load_module, measure, released_imports


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
    root = released_path(Path(settings.released_dir), "linear_patch")
    with released_imports(root, ["rotate_utils", "layer_select", "block_scaling"]):
        layer_select = load_module(root / "layer_select.py", "lp_layer_select")
        block_scaling = load_module(root / "block_scaling.py", "lp_block_scaling")
        hadamard_utils = importlib.import_module("rotate_utils.hadamard_utils")
    loader = [(blocks[i : i + 1],) for i in range(blocks.shape[0])]

    def run() -> tuple:
        with cuda_calls_to(device), contextlib.redirect_stdout(_io.StringIO()), contextlib.redirect_stderr(_io.StringIO()):
            result = layer_select.select_layer(model, loader, settings.num_remove, "rotate", device)
            _, start, end, _, scale, _, _ = result
            model.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(model.model.layers) if i < start or i >= end])
            block_scaling.register_linear_patch(model, start, scale, device, rotated=True)
            return result

    (layer, start, end, similarity, scale, _, _), measurement = measure(run, model, blocks[:1], device)
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
        root = released_path(Path(settings.released_dir), "linear_patch")
        with released_imports(root, ["rotate_utils"]):
            released = importlib.import_module("rotate_utils.hadamard_utils").get_hadamard_matrix(width, "cpu").double()
        lp.hadamard = lambda n: released  # the released order-576 block, not layerfold's Paley construction

    ctx = MethodContext(model, tokenizer, blocks, stats=None, batch_size=1)

    def run() -> dict:
        dense = DenseStack(ctx)
        ctx.remove(list(range(start, end)))
        check_removal_only(ctx.plan, "fixed block", spec.name)
        with torch.no_grad():
            return spec.fn(dense, cfg, interfaces(ctx.plan))

    details, measurement = measure(run, model, blocks[:1], torch.device(settings.device))
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
        same_sequence("position", "where the patch acts: the kept layer after the block (released: output of layer start-1)",
                           [out["released"].record["window"][0]], [out["layerfold"].record["position"]]),
        {**tensor_differences({"scale": rel["scale"]}, {"scale": lf["scale"]}, 5e-3 * float(rel["scale"].abs().max()), name="scale"),
         "what": "the per-channel scale d in the rotated basis; tolerance 5e-3 x max|d|: the released code rotates and averages in float16",
         "max_relative_diff": relative(lf["scale"], rel["scale"])},
        {**tensor_differences({"patch": rel["patch"]}, {"patch": lf["patch"]}, 5e-3 * float(rel["patch"].abs().max()), name="patch"),
         "what": "P = H diag(d) Hᵀ as each side attaches it (float32); tolerance 5e-3 x max|P|"},
        {"name": "rotation_construction", "gate": False, "passed": bool(torch.allclose(own, rel["rotation"], atol=1e-12)),
         "tolerance": "exact", "max_abs_diff": float((own - rel["rotation"]).abs().max()),
         "what": "layerfold's own Hadamard matrix of this width vs the released one (equal for powers of two: Sylvester's; for "
                 "other widths layerfold builds a Paley block, the released code ships a table: both orthonormal Hadamard, different)"},
    ]
