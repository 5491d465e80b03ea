"""Stage `data`: calibration blocks and evaluation data, from the local data directory or the hub.

    dvc repro data        # params: data  ->  data/prepared/calibration/  data/prepared/eval/
"""

import logging

from safetensors.torch import save_file
from transformers import AutoTokenizer

from layerfold.data.calibration import build_calibration
from layerfold.data.text import load_corpus
from layerfold.io import atomic_dir, write_json
from layerfold.stage import BASE, CALIBRATION, EVAL_DATA, start


def main() -> None:
    stage = start("data")
    cfg = stage.params.data
    tokenizer = AutoTokenizer.from_pretrained(BASE)

    blocks, meta = build_calibration(cfg.calibration, tokenizer, cfg.local_dir)
    with atomic_dir(CALIBRATION) as tmp:
        save_file({"input_ids": blocks.contiguous()}, tmp / "blocks.safetensors")
        write_json(tmp / "meta.json", meta)
    logging.info("calibration: %d blocks x %d tokens from %s", *blocks.shape, meta["origin"])

    with atomic_dir(EVAL_DATA) as tmp:
        sources = {}
        for name in ("wikitext2_test", "c4"):
            corpus = load_corpus(name, cfg.local_dir)
            (tmp / f"{name}.txt").write_text(corpus.text, encoding="utf-8")
            sources[name] = {"origin": corpus.origin, "sha256": corpus.sha256, "documents": len(corpus.documents)}
        if cfg.benchmarks:
            from layerfold.data.benchmarks import prepare_benchmarks
            from layerfold.data.text import data_dir

            root = data_dir(cfg.local_dir)
            if root is not None:  # without a local directory lm-eval reads the stock hub datasets itself
                sources["benchmarks"] = prepare_benchmarks(root, tmp / "benchmarks", list(cfg.benchmarks))
        write_json(tmp / "sources.json", sources)
    logging.info("evaluation data written to %s", EVAL_DATA)


if __name__ == "__main__":
    main()
