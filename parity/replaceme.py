"""ReplaceMe (mts-ai/ReplaceMe): distance.py profile_distances + lstsq.py / cosine_dist.py, against method=replaceme."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io as _io
import tempfile
import types
from pathlib import Path

import torch

from parity.adapters_2025 import ReplaceMeModels, Settings, TextBlocks, _stub, _unavailable, cuda_factories_to, own_files_unpickled, stubbed_modules
from parity.compare import same_sequence, tensor_differences, value_differences
from parity.released import released_path
from parity.runner import Outcome, Preloaded, cuda_calls_to, load_model, measure, patched, released_imports, state_of


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
    root = released_path(Path(settings.released_dir), "replaceme")
    stubs = {"termcolor": _stub("termcolor", colored=lambda text, *a, **k: text), "torchmin": _stub("torchmin", minimize=_unavailable)}
    with released_imports(root, ["ReplaceMe"]), stubbed_modules(**stubs), contextlib.redirect_stdout(_io.StringIO()):
        return {name: importlib.import_module(f"ReplaceMe.{name}") for name in ("utils", "distance", "lstsq", "cosine_dist")}


def released_replaceme(settings: Settings, blocks: torch.Tensor, objective: str = "lstsq") -> Outcome:
    device = torch.device(settings.device)
    model, _ = load_model(settings)
    modules = _replaceme_modules(settings)
    models, tokenizer = ReplaceMeModels(model), TextBlocks()
    batches = [list(blocks[i : i + settings.batch_size]) for i in range(0, blocks.shape[0], settings.batch_size)]
    common = dict(model_path=settings.checkpoint, dataset="local-blocks", dataset_column="text", batch_size=settings.batch_size,
                  max_length=blocks.shape[1], layers_to_skip=settings.num_remove, dataset_size=blocks.shape[0])
    patches = [patched(m, AutoModelForCausalLM=models, AutoTokenizer=Preloaded(tokenizer), get_calib_dataloader=lambda *a, **k: batches)
               for name, m in modules.items() if name != "utils"]
    with tempfile.TemporaryDirectory() as work:

        def run() -> str:
            with contextlib.ExitStack() as stack:
                for p in patches:
                    stack.enter_context(p)
                stack.enter_context(contextlib.chdir(work))
                stack.enter_context(cuda_calls_to(device))
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

        path, measurement = measure(run, model, blocks[:1], device)
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
    plan, measurement = measure(lambda: compress(ctx, cfg), model, blocks[:1], torch.device(settings.device))
    fold = plan["details"]["fold_layer"]
    original = load_model(settings)[0]
    unfolded = original.model.layers[fold].mlp.down_proj.weight.detach().double().cpu()
    state = {k: v.to(torch.bfloat16) for k, v in state_of(model).items()}  # as the released code saves: bfloat16
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
        value_differences("block_distance", "mean last-token angular distance of every block of n layers ending before the last "
                               "layer (released distance.py vs layerfold's capture)", released[:last], ours[:last], 1e-4),
        value_differences("block_distance_last", "the block ending at the last layer: released compares HF's post-norm last hidden "
                               "state, layerfold the pre-norm residual stream", released[last:], ours[last:], 1e-4, gate=False),
        same_sequence("block", "removed block [start, end) (released select_non_overlapping_blocks vs layerfold)",
                           list(rel.record["block"]), [details["removed_layers"][0], details["removed_layers"][0] + n]),
    ]
    if objective == "lstsq":
        comparisons += [
            {**tensor_differences({"T": transform_rel}, {"T": transform_lf}, tolerance * max(scale, 1.0), name="transform", gate=not ends_last),
             "what": f"the fitted map T (float64); tolerance {tolerance} x max|T| ({scale:.3g})"
                     + ("; the block ends at the last layer, where the released target is post-norm: not gated" if ends_last else "")},
            tensor_differences({k: v for k, v in weights_rel.items() if k != fold_key},
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
            {**tensor_differences({"T": transform_rel}, {"T": transform_lf}, tolerance, gate=False, name="transform"),
             "what": "the map T after Adam: the released code shuffles with the global RNG and keeps the activations in bfloat16, "
                     "layerfold with a seeded generator in the compute dtype, so the trajectories differ"},
            value_differences("distance_from_identity", "max |T - I| of each side (how far 10 epochs at lr 1e-4 moved T)",
                                   [float((transform_rel - torch.eye(transform_rel.shape[0], dtype=torch.float64)).abs().max())],
                                   [float((transform_lf - torch.eye(transform_lf.shape[0], dtype=torch.float64)).abs().max())], 5e-4),
            tensor_differences({k: v for k, v in weights_rel.items() if k != fold_key},
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
