"""Stage `compress`: run the configured method on the dense model and save the result.

    dvc repro compress    # params: method, compensate, hardware  ->  artifacts/compressed/ (checkpoint + plan.json),
                          #                                           metrics/compress.json (times: metrics/compress_time.json)

Resident or layer by layer (``hardware``), the checkpoint and its sealed ``plan.json`` are one atomic output.
What the stage does, step by step: :mod:`layerfold.compression`.
"""

from layerfold.compression import CompressPaths, compress_stage
from layerfold.stage import BASE, CALIBRATION, CAPTURE, COMPRESSED, METRICS, start


def main() -> None:
    stage = start("compress")
    compress_stage(stage.params, stage.device, stage.dtype, CompressPaths(BASE, CALIBRATION, CAPTURE, COMPRESSED, METRICS))


if __name__ == "__main__":
    main()
