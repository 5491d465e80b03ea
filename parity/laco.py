"""LaCo (yangyifei729/LaCo): the notebook's cells, run as released."""

from __future__ import annotations

import contextlib
import io as _io
import json
from pathlib import Path
from typing import Any

import torch

from parity.compare import same_sequence, tensor_differences, value_differences
from parity.released import released_path
from parity.runner import OnDevice, Outcome, Settings, _spy, load_model, measure, run_layerfold, state_of


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
