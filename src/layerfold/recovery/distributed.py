"""Several processes, one engine: how recovery runs under ``accelerate launch`` or ``torchrun``.

``recovery.distributed`` chooses how the processes share the work (``auto`` decides from the run):

- ``none``: one process (``auto`` with one process; any other value with one process is the same).
- ``ddp``: data-parallel. Every process holds the whole student and the whole teacher; only the
  module that trains is wrapped in DistributedDataParallel, which all-reduces its gradients: the
  decoder layers of a layer-local phase (never the rest of the student, never the teacher), or the
  student of an end-to-end phase, whose frozen parameters DDP leaves out of its gradient buckets. So
  every parameter DDP watches gets a gradient on every micro-batch, ``find_unused_parameters`` stays
  off and no ``static_graph`` is needed; a new wrapper is built for each phase because the set of
  trained parameters changes between phases.
- ``fsdp2``: the student is sharded by FSDP2 (``fully_shard`` through accelerate's
  ``FullyShardedDataParallelPlugin(fsdp_version=2)``), one unit per decoder layer: parameters,
  gradients and AdamW state take 1/N of the memory on each process. For end-to-end phases only (a
  layer-local phase calls single decoder layers, which a sharded model cannot do on its own). The
  student is sharded when the engine is built, from the main process's copy (accelerate's
  ``cpu_ram_efficient_loading``: the other processes' weights are never read), and is never whole on
  a GPU. When ``auto`` chooses ``fsdp2`` the teacher stays replicated, frozen, in eval mode and under
  ``no_grad``: it needs no gradient or optimiser state, so its copy costs only its bf16 weights (16 GB
  for an 8B model), and sharding it would add an all-gather per layer to every micro-batch.
- ``fsdp2`` requested explicitly (``recovery.distributed=fsdp2``) is for models whose weights do not
  fit one device (a 70B student in float32 is 280 GB): only the main process loads the two
  checkpoints, into host memory (:func:`load_for_launch`); the others build them with their parameters
  on the meta device; the student *and* the frozen teacher are sharded one unit per decoder layer,
  each process receiving its shards from the main process, so each GPU holds 1/N of both models
  (plus one layer's gathered weights at a time while it computes).
- ``auto``: ``none`` for one process; ``ddp`` when a phase is layer-local, when the processes are not
  on GPUs (accelerate shards with FSDP only on GPU processes), or when less than
  :data:`DDP_MAX_TRAINABLE_FRACTION` of the student's parameters train (one replacement layer, LoRA):
  gradients and AdamW state of the trained part then add at most 3 bytes per model parameter to the
  4 of the fp32 replica, and DDP's one gradient all-reduce per step is cheaper than FSDP's per-layer
  all-gathers; ``fsdp2`` otherwise (the whole student training end to end).

The global batch decides the optimiser step: ``recovery.grad_accum`` counts the micro-batches of one
step over *all* processes, each process runs ``grad_accum / N`` of them, and the data order is that
of one process (:mod:`layerfold.recovery.batches`), so the same params give the same training on 1
or N processes (up to floating-point reduction order).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn

from layerfold.recovery.errors import RecoveryConfigError

if TYPE_CHECKING:  # accelerate is imported where an Accelerator is made
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

STRATEGIES = ("auto", "none", "ddp", "fsdp2")
# Below this share of trained parameters, `auto` replicates (DDP); at or above it, it shards (FSDP2).
DDP_MAX_TRAINABLE_FRACTION = 0.25
# Device types whose processes accelerate shards with FSDP (it keeps CPU process groups data-parallel).
FSDP_DEVICE_TYPES = ("cuda",)


def launched_processes() -> int:
    """How many processes the launcher started (``torchrun`` and ``accelerate launch`` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a launch (``RANK`` is set by ``torchrun`` and ``accelerate launch``), or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def end_processes() -> None:
    """Wait until every process is here, then close the process group (a no-op for one process)."""
    if launched_processes() == 1:
        return
    from accelerate import PartialState

    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """The device this process trains on: ``device`` itself for one process; under a launcher, this
    process's local GPU (``cuda:LOCAL_RANK``), or the CPU when ``device`` is the CPU. Starts the
    process group (accelerate's ``PartialState``: NCCL on GPUs, gloo on CPUs)."""
    if launched_processes() == 1:
        return device
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu").device


def check_launch(cfg: DictConfig, processes: int) -> None:
    """Settings that cannot work with ``processes`` launched processes (checked before any model work)."""
    requested = cfg.distributed
    if requested not in STRATEGIES:
        raise RecoveryConfigError(f"recovery.distributed='{requested}' is unknown; choose one of {', '.join(STRATEGIES)}.")
    if processes > 1 and requested == "none":
        raise RecoveryConfigError(
            f"recovery.distributed=none, but {processes} processes were launched. Use recovery.distributed=auto "
            "(or ddp / fsdp2), or start one process (`python -m pipeline.recover`)."
        )
    if processes > 1 and requested == "fsdp2" and cfg.local.enabled:
        raise RecoveryConfigError(
            f"recovery.distributed=fsdp2 shards the student for end-to-end training, but recovery={cfg.name} has "
            "layer-local distillation (recovery.local.enabled=true), which calls single decoder layers and runs "
            "data-parallel. Use recovery.distributed=ddp (or auto)."
        )
    if cfg.grad_accum % processes:
        sequences = cfg.batch_size * cfg.grad_accum
        keep = (f"; grad_accum={processes} with batch_size={sequences // processes} keeps the global batch of {sequences} sequences"
                if sequences % processes == 0 else "")
        raise RecoveryConfigError(
            f"recovery.grad_accum={cfg.grad_accum} must be a multiple of the {processes} launched processes: it counts "
            f"the micro-batches of one optimiser step over all processes, and each runs grad_accum / {processes} of them. "
            f"Use grad_accum={-(-cfg.grad_accum // processes) * processes}{keep}, or launch a divisor of {cfg.grad_accum} processes."
        )


def resolve_strategy(requested: str, processes: int, trainable_fraction: float, has_local_phase: bool, device_type: str) -> str:
    """``none``, ``ddp`` or ``fsdp2`` for ``recovery.distributed=requested`` (see the module docstring)."""
    if processes == 1:
        return "none"
    if requested == "fsdp2" and device_type not in FSDP_DEVICE_TYPES:
        raise RecoveryConfigError(
            f"recovery.distributed=fsdp2 needs GPU processes (accelerate shards with FSDP only on GPUs), but these "
            f"processes train on {device_type}. Use recovery.distributed=ddp (or auto)."
        )
    if requested == "auto":
        if has_local_phase or device_type not in FSDP_DEVICE_TYPES or trainable_fraction < DDP_MAX_TRAINABLE_FRACTION:
            return "ddp"
        return "fsdp2"
    return requested


def loads_sharded(cfg: DictConfig, processes: int) -> bool:
    """True when the models are loaded by the main process only and sharded from it (``recovery.distributed=fsdp2``
    under a launcher): the teacher is then sharded too, for models whose weights do not fit one device."""
    return processes > 1 and cfg.distributed == "fsdp2"


def load_for_launch(path: str | Path, device: torch.device, dtype: torch.dtype | str, cfg: DictConfig,
                    processes: int) -> tuple[nn.Module, Any]:
    """Model and tokenizer of the checkpoint at ``path`` for this process of a launch.

    Usually the whole model on ``device`` (every process loads its own copy). When the models are
    sharded from the main process (:func:`loads_sharded`), the main process loads it into host memory
    and every other process builds it from the config with its parameters on the meta device (no
    memory, nothing read) and real buffers (rotary frequencies are in no state dict); the engine
    shards both from the main process's copy.
    """
    from layerfold.models.sources import load_checkpoint, resolve_dtype, resolve_pointer, POINTER_FILE

    if not loads_sharded(cfg, processes):
        return load_checkpoint(path, device, dtype)
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype  # the training device's, on every process
    if is_main_process():
        return load_checkpoint(path, "cpu", dtype)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from layerfold.models.replacement import SIDE_FILE

    path = Path(path)
    if (path / POINTER_FILE).exists() and not (path / "config.json").exists():
        path = resolve_pointer(path)
    if (path / SIDE_FILE).exists():  # replacement layers are rebuilt from the side file: load as the main process does
        model, tokenizer = load_checkpoint(path, "cpu", dtype)
        return model.to("meta"), tokenizer
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def shard(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """``model`` sharded in place by FSDP2 as :func:`fsdp2_plugin` says (a collective): its weights come from the
    main process's copy; the others may hold theirs on the meta device."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, model)


def copy_full_into(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy a whole tensor (a checkpoint's) into ``param``: this process's shard of it for an FSDP2 parameter."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        # every process holds the whole tensor: each keeps its own slice, nothing is sent
        tensor = distribute_tensor(tensor.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(tensor)


def fsdp2_plugin(bf16: bool) -> FullyShardedDataParallelPlugin:
    """accelerate's FSDP2 settings for the student (and a sharded teacher): one unit per decoder layer (the model's
    ``_no_split_modules``), resharded after forward; under bf16 the layers compute in bf16 while
    gradients are reduced in float32 onto the float32 master weights. Weights are taken from the main
    process's copy (``cpu_ram_efficient_loading``), so the other processes may hold theirs on the meta device."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        cpu_ram_efficient_loading=True,  # the main process's weights are broadcast; the others' are never read
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None,
    )


def make_accelerator(strategy: str, device: torch.device, bf16: bool, accumulation: int) -> Accelerator:
    """The Accelerator for one engine: process setup and device, bf16 autocast or none, ``accumulation``
    micro-batches per optimiser step on this process, DDP or FSDP2 as ``strategy`` says.

    The LR schedule is stepped by the engine once per optimiser step (its horizon counts optimiser
    steps), so accelerate must not step it once per process.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    mixed_precision = "bf16" if bf16 else "no"
    if strategy == "none":
        _fit_single_process_state(device, mixed_precision)
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=accumulation,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        fsdp_plugin=fsdp2_plugin(bf16) if strategy == "fsdp2" else None,
    )
    sharding = accelerator.distributed_type == DistributedType.FSDP
    if strategy == "fsdp2" and not accelerator.is_fsdp2:
        raise RecoveryConfigError(
            f"recovery.distributed=fsdp2, but accelerate set up {accelerator.distributed_type} (FSDP needs GPU processes, and "
            "accelerate fixes its setup at the first Accelerator of a process). Use recovery.distributed=ddp, or start fresh processes."
        )
    if strategy != "fsdp2" and sharding:
        raise RecoveryConfigError(
            f"recovery.distributed resolved to {strategy}, but the launcher enabled FSDP (an accelerate config with FSDP, "
            "--use_fsdp or ACCELERATE_USE_FSDP=true). layerfold chooses sharding from recovery.distributed: launch without "
            "FSDP settings, or set recovery.distributed=fsdp2."
        )
    return accelerator


def _fit_single_process_state(device: torch.device, mixed_precision: str) -> None:
    """Let a single process train several students with different precision or device one after another.

    accelerate keeps one process-wide state, fixed by the first Accelerator; a later Accelerator with
    another ``mixed_precision`` or device raises. With one process there is no process group to keep,
    so a state that does not fit is dropped and rebuilt (tests, notebooks, ``scripts/run_methods.py``).
    """
    from accelerate.state import AcceleratorState, PartialState

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # accelerate's single-process device is the current CUDA device
    precision = AcceleratorState._shared_state.get("_mixed_precision")  # None until an Accelerator was made
    current = PartialState._shared_state.get("device")  # None until the process state was made
    wrong_precision = precision is not None and precision != mixed_precision
    wrong_device = current is not None and (
        current.type != device.type or (device.index is not None and current.index not in (None, device.index))
    )
    if wrong_precision or wrong_device:
        AcceleratorState._reset_state(reset_partial_state=True)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process for an FSDP2 shard (a collective), itself otherwise."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure whose parameters live on the meta device (no memory).

    FSDP2 shards a model in place and cannot undo it; the skeleton, taken before sharding, receives the
    gathered weights at the end (:func:`materialise`) and is an ordinary model again: LoRA merges into
    it and ``save_pretrained`` writes it. Any structure a method left (merged or concatenated layers,
    replacement modules) is kept, which rebuilding from the config would not do. Buffers are copied
    for real: they are small, and the non-persistent ones (rotary frequencies) are in no state dict.
    """
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, memo)


def materialise(skeleton: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Put the full ``state_dict`` (host tensors) into ``skeleton``'s parameters; the model ends on the host."""
    skeleton.load_state_dict(state_dict, strict=True, assign=True)
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()  # assign=True gave tied names separate tensors; tie them again
    return skeleton.to("cpu")
