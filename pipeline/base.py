"""Stage `base`: load the configured model source and write a plain HF checkpoint.

    dvc repro base        # params: model     ->  artifacts/base/ (safetensors, config, tokenizer, source.json)

Everything that can rule the model out is checked before anything is written: the architecture and
the params against the source's config (before the weights load), then the tokenizer against the
loaded embedding. Which weights these are (name, file, quantisation, sha256) goes into the checkpoint's
config (``layerfold_source``), so every model derived from it and every metric carries it, and into
``source.json``.
"""

import logging

from layerfold.io import write_json
from layerfold.models import check_compatible, describe, identity, load_source, probe, save_checkpoint
from layerfold.models.facts import source_parameters
from layerfold.models.resources import guard_source_load
from layerfold.models.sources import IDENTITY_ATTR, resolve_dtype
from layerfold.stage import BASE, expand, start
from layerfold.validation import check


def main() -> None:
    stage = start("base")
    cfg = stage.params.model.copy()
    cfg.path, cfg.tokenizer = expand(cfg.path), expand(cfg.tokenizer)
    check(stage.params, probe(cfg))
    num_parameters = source_parameters(cfg)
    if num_parameters:  # known from the GGUF or safetensors headers
        guard_source_load(num_parameters, copies=2 if cfg.source in ("gguf", "package") else 1)
    model, tokenizer = load_source(cfg)
    check_compatible(model, tokenizer)
    setattr(model.config, IDENTITY_ATTR, {"name": cfg.name, **identity(cfg, cfg.storage_dtype)})
    save_checkpoint(model, tokenizer, BASE, dtype=resolve_dtype(cfg.storage_dtype))
    facts = {"source": cfg.source, **describe(model)}
    write_json(BASE / "source.json", facts)
    logging.info("wrote %s: %s, %d layers, %.1fM parameters", BASE, facts["quantization"], facts["num_layers"], facts["params_total"] / 1e6)


if __name__ == "__main__":
    main()
