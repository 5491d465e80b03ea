"""Stage `evaluate@<name>`: perplexity, lm-eval benchmarks and efficiency of one checkpoint.

    dvc repro evaluate@dense evaluate@compressed   # params: eval

Outputs (:func:`layerfold.evaluation.checkpoint.evaluate_checkpoint` computes them):

- ``metrics/<name>.json`` (DVC metrics): numbers a rerun on the same inputs reproduces to the byte --
  the model's size, perplexities, each task's aggregates and the evaluation settings;
- ``metrics/documents/<name>.json`` (a plain output): per task, each document's 0/1 result, chosen and
  gold answer and number of choices, and the task's floor (chance, majority class), for paired
  differences and answer drift (:func:`layerfold.evaluation.results.split_documents`);
- ``metrics/timings/[<experiment>/]evaluate-<name>.json`` (git-ignored, not a DVC output, so its
  changing bytes touch neither git nor ``dvc.lock``): wall times, the efficiency measurement, the device
  and library versions. Under ``dvc exp run`` it goes to the main workspace (``$DVC_ROOT``), one folder
  per experiment, where ``scripts/runs.py collect`` finds it.

Usage: python -m pipeline.evaluate <name> <checkpoint dir>
"""

import logging
import sys

from layerfold.evaluation.checkpoint import evaluate_checkpoint, numbers_to_track, same_model_as, timings_file
from layerfold.io import write_json
from layerfold.stage import EVAL_DATA, METRICS, start
from layerfold.tracking import init_run

DOCUMENTS = METRICS / "documents"  # per-document results: a plain output, not a metrics file
TIMINGS = METRICS / "timings"  # wall times, efficiency, device, versions: git-ignored, not a DVC output


def main(name: str, checkpoint: str) -> None:
    stage = start(f"evaluate@{name}")
    if (target := same_model_as(checkpoint)) is not None:
        write_json(METRICS / f"{name}.json", {"same_model_as": target})
        write_json(DOCUMENTS / f"{name}.json", {"same_model_as": target})
        logging.info("%s points at %s, which evaluate scores under its own name; nothing to do", checkpoint, target)
        return
    run = init_run(stage.params, f"evaluate-{name}")
    metrics, documents, machine = evaluate_checkpoint(stage.params, checkpoint, name, stage.device, stage.dtype, EVAL_DATA)
    write_json(METRICS / f"{name}.json", metrics)
    write_json(DOCUMENTS / f"{name}.json", documents)
    write_json(timings_file(TIMINGS, name), machine)
    run.log(numbers_to_track(metrics, machine))
    run.finish()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m pipeline.evaluate <name> <checkpoint dir>")
    main(sys.argv[1], sys.argv[2])
