"""Stage `capture`: stream layer-boundary statistics of the dense model over the calibration blocks.

    dvc repro capture     # params: capture, hardware  ->  artifacts/capture/{stats.safetensors, stats.json}

``hardware=resident`` runs the whole model batch by batch; ``hardware=sequential`` one decoder layer
at a time over every sequence, weights read per layer (:mod:`layerfold.execution`): same statistics.
"""

import logging

from safetensors.torch import load_file, save_file

from layerfold import execution
from layerfold.capture import BoundaryStatistics
from layerfold.io import atomic_dir, write_json
from layerfold.models.facts import checkpoint_facts
from layerfold.models.resources import guard
from layerfold.scoring.similarity import block_influence
from layerfold.stage import BASE, CALIBRATION, CAPTURE, start


def main() -> None:
    stage = start("capture")
    blocks = load_file(CALIBRATION / "blocks.safetensors")["input_ids"]
    batch_size, hardware = stage.params.capture.batch_size, stage.params.hardware
    if hardware.mode == "resident":  # the estimate assumes the whole model on the device
        guard(BASE, stage.device, stage.dtype, batch_size, blocks.shape[1], "capture.batch_size", all_boundaries=True)
    stats = BoundaryStatistics(checkpoint_facts(BASE).num_layers + 1, max_distance=stage.params.capture.max_distance)
    cost = execution.capture_statistics(BASE, blocks, hardware, stats, stage.device, stage.dtype, batch_size)
    logging.info("captured %d sequences x %d tokens, %s", *blocks.shape, cost.sentence())
    logging.debug("capture cost: %s", cost.as_dict())
    bi = block_influence(stats.cosine)
    with atomic_dir(CAPTURE) as tmp:
        save_file({k: v.contiguous() for k, v in stats.tensors().items()}, tmp / "stats.safetensors")
        write_json(
            tmp / "stats.json",
            {
                "num_layers": len(bi),
                "tokens": stats.tokens,
                "sequences": stats.sequences,
                "device": str(stage.device),
                "dtype": str(stage.dtype).replace("torch.", ""),
                "block_influence": [float(v) for v in bi],
                "cosine": stats.cosine.tolist(),
                "last_token_angular": stats.last_token_angular.tolist(),
            },
        )
    logging.info("lowest Block Influence: layers %s", ", ".join(map(str, sorted(range(len(bi)), key=lambda i: float(bi[i]))[:8])))


if __name__ == "__main__":
    main()
