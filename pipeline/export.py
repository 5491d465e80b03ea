"""Stage `export` (optional, off by default): the final checkpoint as a GGUF file for llama.cpp / Ollama.

    dvc repro export      # params: export, model  ->  artifacts/export/ (model.gguf, export.json), metrics/export.json

With ``export.enabled=false`` it only records that nothing was exported. Otherwise it writes the checkpoint
``export.checkpoint`` names (the recovered one by default, following recovery=none's pointer) as GGUF in
``export.quantization`` (``source``: each tensor's type in the source GGUF), with the source GGUF's tokenizer
and chat template when the model came from one, and (``export.verify``) loads the file with transformers' GGUF
reader and compares its logits with the checkpoint's on two calibration blocks. A checkpoint that is not
stock, an architecture without a writer or a quantisation that cannot be written stops it before writing.
"""

import logging
from pathlib import Path

from safetensors.torch import load_file

from layerfold.export import checkpoint_kind, export_gguf
from layerfold.export.checks import GGUF_SOURCES
from layerfold.export.verify import verify_export
from layerfold.io import atomic_dir, portable_path, read_json, write_json
from layerfold.models.card import write_model_card
from layerfold.models.facts import source_path
from layerfold.models.sources import resolve_pointer
from layerfold.surgery.plan import describe_plan
from layerfold.stage import BASE, CALIBRATION, COMPRESSED, METRICS, RECOVERED, expand, start

EXPORT = Path("artifacts/export")
CHECKPOINTS = {"recovered": RECOVERED, "compressed": COMPRESSED, "base": BASE}
VERIFY_BLOCKS = 2  # calibration blocks the logits are compared on


def _write_card(folder: Path, checkpoint: Path, params, report: dict) -> None:
    """The GGUF file's model card: the checkpoint it was written from, its plan, the export checks."""
    plan_file = resolve_pointer(checkpoint) / "plan.json"
    plan = read_json(plan_file) if plan_file.exists() else None
    model, cfg = params.model, params.export
    verify = report.get("verify") or {}
    metrics = [f"GGUF {report['file_type']}, {report['block_count']} layers, {report['bytes'] / 1e6:.1f} MB (`export.json`)"]
    if verify:
        metrics.append(f"against `{checkpoint}` on {VERIFY_BLOCKS} calibration blocks: top-1 agreement {verify['top1_agreement']:.3f}, "
                       f"largest logit difference {verify['max_abs_logit_diff']:.4g}")
    metrics.append(f"accuracies of the checkpoint it was written from: `metrics/{cfg.checkpoint if cfg.checkpoint != 'base' else 'dense'}.json`, "
                   "headline in `metrics/summary.json` and `reports/report.md`")
    write_model_card(
        folder, identity_from=resolve_pointer(checkpoint), path_hint=str(EXPORT / "model.gguf"),
        title=f"{model.name} as GGUF ({cfg.quantization}), from {checkpoint}",
        method=plan["method"] if plan else None, plan_line=describe_plan(plan) if plan else None,
        recovery={"name": plan["recovery"]["name"]} if plan and plan.get("recovery") else None,
        base_model_id=model.id if model.source == "hub" else None, metrics=metrics,
        load_lines=["llama.cpp (`llama-cli -m artifacts/export/model.gguf`), Ollama (`FROM ./model.gguf` in a Modelfile), "
                    "or transformers' GGUF reader:", "", "```python", "from transformers import AutoModelForCausalLM",
                    'model = AutoModelForCausalLM.from_pretrained("artifacts/export", gguf_file="model.gguf")', "```"],
    )


def main() -> None:
    stage = start("export")
    cfg = stage.params.export
    if not cfg.enabled:
        with atomic_dir(EXPORT) as tmp:
            write_json(tmp / "export.json", {"enabled": False})
        write_json(METRICS / "export.json", {"enabled": False})
        logging.info("export.enabled=false: nothing exported (`-S export.enabled=true` writes %s/model.gguf)", EXPORT)
        return
    checkpoint = CHECKPOINTS[cfg.checkpoint]
    model = stage.params.model.copy()
    model.path = expand(model.path)
    source = source_path(model) if model.source in GGUF_SOURCES else None
    with atomic_dir(EXPORT) as tmp:
        report = export_gguf(checkpoint, tmp / "model.gguf", cfg.quantization, source)
        report["checkpoint"] = portable_path(resolve_pointer(checkpoint).resolve())
        report["checkpoint_kind"] = checkpoint_kind(checkpoint)
        if cfg.verify:
            blocks = load_file(CALIBRATION / "blocks.safetensors")["input_ids"][:VERIFY_BLOCKS]
            report["verify"] = verify_export(checkpoint, tmp / "model.gguf", blocks)
        write_json(tmp / "export.json", report)
        _write_card(tmp, checkpoint, stage.params, report)
    summary = {"enabled": True, **{k: report[k] for k in ("bytes", "block_count", "quantization", "file_type", "tensor_types")},
               **({"verify": {k: report["verify"][k] for k in ("max_abs_logit_diff", "top1_agreement", "nll_checkpoint", "nll_gguf")}}
                  if cfg.verify else {})}
    write_json(METRICS / "export.json", summary)
    logging.info("wrote %s/model.gguf: %d layers, %s, %.1f MB", EXPORT, report["block_count"], report["file_type"], report["bytes"] / 1e6)


if __name__ == "__main__":
    main()
