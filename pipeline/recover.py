"""Stage `recover`: heal the compressed model with the recovery engine, or pass it through.

    dvc repro recover     # params: recovery  ->  artifacts/recovered/, metrics/recover.json, metrics/recover_curve.csv
                          #                       (times, memory, device: metrics/recover_time.json, not tracked)

    accelerate launch --num_processes 2 -m pipeline.recover      # the same stage on 2 GPUs of one host
    accelerate launch --multi_gpu --num_processes 8 -m pipeline.recover   # with recovery.distributed=fsdp2: models
                                                                          # larger than one GPU (docs/scaling.md)
    torchrun --standalone --nproc_per_node 2 -m pipeline.recover  # the same, launched by torchrun

``recovery=none`` writes the compressed checkpoint itself (hard links or copies, with a ``pointer.json`` naming it), so
``artifacts/recovered`` always loads with ``from_pretrained``; otherwise the dense base model teaches the
compressed one as ``plan.json`` says, resident or layer by layer (``hardware``). What the stage does, step by
step: :mod:`layerfold.recovery.run`.
"""

from layerfold.recovery.run import RecoverPaths, recover_stage
from layerfold.stage import BASE, COMPRESSED, METRICS, RECOVERED, RECOVERY_STATE, start


def main() -> None:
    stage = start("recover")
    recover_stage(stage.params, stage.device, stage.dtype, RecoverPaths(BASE, COMPRESSED, RECOVERED, RECOVERY_STATE, METRICS))


if __name__ == "__main__":
    main()
