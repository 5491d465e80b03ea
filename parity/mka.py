"""MKA (SempraETY/Pruning-via-Merging): pipeline.py main() end to end, and its scoring on layerfold's features."""

from __future__ import annotations

import contextlib
import io as _io
import os
import pickle
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parity.compare import same_sequence, tensor_differences, value_differences
from parity.released import released_path
from parity.runner import Outcome, Preloaded, Settings, _spy, cuda_calls_to, load_model, load_module, measure, patched


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
