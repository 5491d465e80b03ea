"""CoMe (WangFei-2019/CoMe): methods/concat_merge.py main_func on the stock model, scores through hooks."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io as _io
import math
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerfold.io import read_json
from parity.compare import same_sequence, tensor_differences, value_differences
from parity.released import released_path
from parity.runner import Outcome, Preloaded, Settings, _spy, load_model, measure, patched, released_imports, state_of


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
