"""Stage `base`: load the configured model source and write a plain HF checkpoint.

    dvc repro base        # params: model     ->  artifacts/base/ (safetensors, config, tokenizer, source.json)
"""

import logging

from layerfold.io import write_json
from layerfold.models import describe, load_source, save_checkpoint
from layerfold.models.sources import resolve_dtype
from layerfold.stage import BASE, expand, start


def main() -> None:
    stage = start("base")
    cfg = stage.params.model.copy()
    cfg.path, cfg.tokenizer = expand(cfg.path), expand(cfg.tokenizer)
    model, tokenizer = load_source(cfg)
    save_checkpoint(model, tokenizer, BASE, dtype=resolve_dtype(cfg.storage_dtype))
    facts = {"name": cfg.name, "source": cfg.source, **describe(model)}
    write_json(BASE / "source.json", facts)
    logging.info("wrote %s: %d layers, %.1fM parameters", BASE, facts["num_layers"], facts["params_total"] / 1e6)


if __name__ == "__main__":
    main()
