"""LLM-Streamline (RUCKBReasoning/LLM-Streamline): get_cosine.py's window and train_mseloss.py's pruned model (before training)."""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io as _io
from pathlib import Path
from typing import Any

import torch

from parity.compare import same_sequence, tensor_differences, value_differences
from parity.released import released_path
from parity.runner import Outcome, Settings, _spy, load_model, measure, patched, released_imports, state_of


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
