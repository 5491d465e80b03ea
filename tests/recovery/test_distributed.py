"""The recovery engine on two processes (``torchrun``, gloo on CPU) against one process with the same global batch.

One ``torchrun --nproc_per_node 2`` launch runs every scenario (this file is also the worker script);
the one-process references run in the test process. Both use one thread per process, so the only
difference left is the order of floating-point reductions (gradients averaged over two processes).

accelerate shards with FSDP only on GPU process groups; to check the engine's FSDP2 path here (sharding,
gradient clipping on shards, the full state dict gathered on the main process, LoRA merged into the
gathered model), the ``*_fsdp2`` scenarios force accelerate's FSDP2 mode on the CPU process group.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest, when torchrun runs this file as a script

from conftest import REPO  # noqa: E402
from layerfold.config import RecoveryConfig, compose  # noqa: E402
from layerfold.models.adapters import get_adapter  # noqa: E402
from layerfold.recovery import RecoveryConfigError, RecoveryEngine  # noqa: E402
from layerfold.recovery.batches import MicroBatches  # noqa: E402
from layerfold.recovery.distributed import DDP_MAX_TRAINABLE_FRACTION, check_launch, resolve_strategy  # noqa: E402
from layerfold.surgery import LayerPlan, remove_layers  # noqa: E402

# 4 optimiser steps of 8 sequences (4 micro-batches of 2): one process runs 4 micro-batches per step, two run 2 each.
STEPS = dict(max_steps=4, batch_size=2, grad_accum=4, lr=1e-2, min_lr=1e-3, log_every=1, checkpoint_every=1000)
SCENARIOS = {
    "distill": dict(mode="distill", remove=[1, 2], strategy="ddp"),
    "lm": dict(mode="lm", remove=[1, 2], strategy="ddp"),
    "lora": dict(mode="lora", remove=[2], strategy="ddp"),
    "come": dict(mode="come", remove=[1, 2], strategy="ddp"),
    "lm_fsdp2": dict(mode="lm", remove=[2], strategy="fsdp2", overrides={"trainable": "layers"}, tied=True),
    "lora_fsdp2": dict(mode="lora", remove=[2], strategy="fsdp2", overrides={"distributed": "fsdp2"}),
}
KILLED_AT = ("end_to_end", 3)  # the resume scenarios are killed there, with a checkpoint every 2 steps


def tiny_llama(tied: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config).eval()


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(seed))


def recovery_cfg(mode: str, **overrides) -> OmegaConf:
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), compose(REPO / "conf", [f"recovery={mode}"])["recovery"])
    cfg.merge_with({**STEPS, **overrides})
    return cfg


def scenario_models(name: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Teacher, student (the teacher without the scenario's layers) and plan; the same in every process."""
    spec = SCENARIOS[name]
    teacher = tiny_llama(spec.get("tied", False))
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)
    plan = LayerPlan(get_adapter(teacher).num_layers(teacher))
    remove_layers(student, spec["remove"])
    plan.remove(spec["remove"])
    return teacher, student, plan


def scenario_engine(name: str, **engine_kwargs) -> RecoveryEngine:
    spec = SCENARIOS[name]
    teacher, student, plan = scenario_models(name)
    cfg = recovery_cfg(spec["mode"], **spec.get("overrides", {}), **engine_kwargs.pop("overrides", {}))
    # 27 blocks: an epoch is 13 micro-batches of 2 and a short one of 1 (global micro-batch 13, process 1's in step 3);
    # the 16 micro-batches of 4 steps run into the next epoch
    return RecoveryEngine(student, teacher, {**plan.to_json(), "details": {}}, cfg, tokens(27, 1), tokens(4, 2), progress=False, **engine_kwargs)


def result(engine: RecoveryEngine, model: torch.nn.Module | None, summary: dict) -> dict:
    return {"curve": engine.curve, "distributed": summary["distributed"], "processes": summary["processes"],
            "weights": None if model is None else {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}}


# -- the worker: `torchrun --nproc_per_node 2 tests/recovery/test_distributed.py OUT` ---------------------------------
def force_fsdp2_on_cpu() -> None:
    """Put accelerate's process-wide state into FSDP2 mode on the CPU process group (it enables FSDP for GPUs only)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    import layerfold.recovery.distributed as distributed

    distributed.FSDP_DEVICE_TYPES = ("cuda", "cpu")
    AcceleratorState._reset_state()  # keeps the process group
    PartialState().distributed_type = DistributedType.FSDP  # every later Accelerator copies it from here
    plugin = distributed.fsdp2_plugin(bf16=False)  # what the engine passes
    Accelerator(cpu=True, fsdp_plugin=plugin)
    AcceleratorState().fsdp_plugin = plugin


def worker(out: Path) -> None:
    import layerfold.recovery.state as state_module  # where the resumable state is written

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    writes = []
    atomic_file = state_module.atomic_file

    def counting_atomic_file(path, *args, **kwargs):
        writes.append(str(path))
        return atomic_file(path, *args, **kwargs)

    state_module.atomic_file = counting_atomic_file
    results = {}
    for name in ("distill", "lm", "lora"):
        engine = scenario_engine(name)
        results[name] = result(engine, *engine.run())

    class Killed(Exception):
        pass

    def kill(phase: str, step: int) -> None:
        if (phase, step) == KILLED_AT:
            raise Killed

    def killed_and_resumed(name: str) -> dict:
        state_dir = out / f"state-{name}"
        with pytest.raises(Killed):
            scenario_engine(name, state_dir=state_dir, on_step=kill, overrides={"checkpoint_every": 2}).run()
        state_written = (state_dir / "state.pt").exists()
        engine = scenario_engine(name, state_dir=state_dir, overrides={"checkpoint_every": 2})  # untrained student again
        return {**result(engine, *engine.run()), "state_written": state_written, "state_left": (state_dir / "state.pt").exists()}

    results["come_resumed"] = killed_and_resumed("come")
    force_fsdp2_on_cpu()
    for name in ("lm_fsdp2", "lora_fsdp2"):
        engine = scenario_engine(name)
        results[name] = result(engine, *engine.run())
    results["lm_fsdp2_resumed"] = killed_and_resumed("lm_fsdp2")
    torch.save({"rank": rank, "writes": writes, "results": results}, out / f"rank{rank}.pt")


# -- the tests ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Start the two-process run; the one-process references are computed while it runs."""
    out = tmp_path_factory.mktemp("two_processes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    with open(out / "log.txt", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield process, out
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def two_processes(launch, one_process) -> dict[int, dict]:
    process, out = launch
    assert process.wait(timeout=600) == 0, (out / "log.txt").read_text()[-8000:]
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)}


@pytest.fixture(scope="module")
def one_thread():
    """One thread, as each worker has (OMP_NUM_THREADS=1): the same kernels, and no thread oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(one_thread) -> dict[str, dict]:
    """The references: the same scenarios in this (single) process."""
    results = {}
    for name in SCENARIOS:
        engine = scenario_engine(name)
        initial = {n: t.clone() for n, t in scenario_models(name)[1].state_dict().items()}
        results[name] = {**result(engine, *engine.run()), "initial": initial}
    return results


def compared(one: dict, two: dict) -> None:
    """Two processes against one: the same steps, tokens and learning rates; per-step losses within 1e-5; parameters
    that did not train equal bit for bit, and every trained parameter's update the same within 0.1 % of its size
    (AdamW divides by the gradients' running scale, so reduction-order noise in small gradients moves the weights
    more than the losses)."""
    assert [(p["phase"], p["step"], p["tokens"]) for p in two["curve"]] == [(p["phase"], p["step"], p["tokens"]) for p in one["curve"]]
    assert [p["lr"] for p in two["curve"]] == pytest.approx([p["lr"] for p in one["curve"]], rel=1e-12)
    losses_one, losses_two = [p["loss"] for p in one["curve"]], [p["loss"] for p in two["curve"]]
    assert max(abs(a - b) for a, b in zip(losses_one, losses_two)) < 1e-5, (losses_one, losses_two)
    assert len(set(losses_one)) > 1  # the loss moves: the comparison is not between constants
    assert one["weights"].keys() == two["weights"].keys()
    trained = 0
    for name, after in one["weights"].items():
        update = (after - one["initial"][name]).norm()
        if update == 0:
            assert torch.equal(two["weights"][name], after), name
        else:
            trained += 1
            assert (two["weights"][name] - after).norm() / update < 1e-3, name
    assert trained


@pytest.mark.parametrize("name", ["distill", "lm", "lora", "lm_fsdp2", "lora_fsdp2"])
def test_two_processes_follow_one_process_with_the_same_global_batch(two_processes, one_process, name):
    """Per-step loss (averaged over processes), tokens, learning rate and final weights match one process."""
    main, other = two_processes[0]["results"][name], two_processes[1]["results"][name]
    assert (main["processes"], main["distributed"]) == (2, SCENARIOS[name]["strategy"])
    assert one_process[name]["distributed"] == "none"
    compared(one_process[name], main)
    assert other["weights"] is None  # the final (LoRA-merged, gathered) model exists on the main process only
    assert other["curve"] == main["curve"]  # every process logged the same averaged curve


@pytest.mark.parametrize("name", ["come", "lm_fsdp2"])
def test_only_the_main_process_writes_checkpoints_and_a_killed_run_resumes(two_processes, one_process, name):
    """Killed in its end-to-end phase after the checkpoint at step 2 and resumed by a new engine with an untrained
    student: every process read the checkpoint (replicated, or re-sharded for FSDP2) and the run ends as one
    uninterrupted process does."""
    main, other = two_processes[0], two_processes[1]
    assert other["writes"] == []
    assert main["writes"] and {Path(w).name for w in main["writes"]} == {"state.pt"}
    assert any(f"state-{name}" in w for w in main["writes"])
    resumed = main["results"][f"{name}_resumed"]
    assert resumed["state_written"] and not resumed["state_left"]
    compared(one_process[name], resumed)


def test_the_main_process_merges_lora_into_a_vanilla_model(two_processes):
    """The names of a stock 3-layer Llama: the adapters are merged into the weights (replicated and gathered from shards)."""
    stock = set(tiny_llama().state_dict()) - {n for n in tiny_llama().state_dict() if ".layers.3." in n}
    for name in ("lora", "lora_fsdp2"):
        assert set(two_processes[0]["results"][name]["weights"]) == stock


# -- without a launch ---------------------------------------------------------------------------------------------
def test_two_shards_of_the_micro_batch_order_interleave_into_the_one_process_order():
    """accelerate's batch-sampler shard gives process r the global micro-batches r, r + 2, ...: none twice, none
    skipped, the short last micro-batch of an epoch (7 rows in batches of 3) kept as it is."""
    from accelerate.data_loader import BatchSamplerShard

    whole = list(MicroBatches(7, 3, seed=0, start=4, stop=16))
    shards = [list(BatchSamplerShard(MicroBatches(7, 3, seed=0, start=4, stop=16), num_processes=2, process_index=r)) for r in (0, 1)]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    assert [len(b) for b in whole[:3]] == [3, 1, 3]  # micro-batch 5 is the short end of epoch 1
    assert sorted(sum(whole[2:5], [])) == list(range(7))  # micro-batches 6-8 are one epoch: every row once


@pytest.mark.parametrize("requested, processes, fraction, local, device, expected", [
    ("auto", 1, 0.9, False, "cuda", "none"),
    ("fsdp2", 1, 0.9, False, "cuda", "none"),
    ("auto", 2, 0.9, True, "cuda", "ddp"),  # a layer-local phase
    ("auto", 2, DDP_MAX_TRAINABLE_FRACTION / 2, False, "cuda", "ddp"),  # a small trained part
    ("auto", 2, DDP_MAX_TRAINABLE_FRACTION, False, "cuda", "fsdp2"),  # most of the student trains
    ("auto", 2, 0.9, False, "cpu", "ddp"),  # accelerate has no FSDP for CPU processes
    ("ddp", 8, 0.9, False, "cuda", "ddp"),
])
def test_auto_strategy(requested, processes, fraction, local, device, expected):
    assert resolve_strategy(requested, processes, fraction, local, device) == expected


def test_fsdp2_on_cpu_processes_is_an_error():
    with pytest.raises(RecoveryConfigError, match="distributed=fsdp2 needs GPU processes"):
        resolve_strategy("fsdp2", 2, 0.9, False, "cpu")


@pytest.mark.parametrize("mode, overrides, processes, match", [
    ("lm", {"grad_accum": 3, "batch_size": 4}, 2, r"recovery.grad_accum=3 must be a multiple of the 2 launched processes.*grad_accum=4"),
    ("lm", {"grad_accum": 1, "batch_size": 16}, 2, r"grad_accum=2 with batch_size=8 keeps the global batch of 16"),
    ("lm", {"distributed": "none"}, 2, r"recovery.distributed=none, but 2 processes"),
    ("distill", {"distributed": "fsdp2", "grad_accum": 2}, 2, r"recovery.distributed=fsdp2 .* layer-local"),
])
def test_launch_settings_that_cannot_work_name_the_key_and_the_fix(mode, overrides, processes, match):
    with pytest.raises(RecoveryConfigError, match=match):
        check_launch(recovery_cfg(mode, **overrides), processes)


def test_one_process_trains_in_bf16_then_fp32(one_thread):
    """accelerate fixes its precision at the first Accelerator of a process; one process may still train
    several students with different precision one after another."""
    bf16 = scenario_engine("lm", overrides={"precision": "bf16", "max_steps": 1})
    assert bf16.precision == "bf16-autocast" and bf16.accelerator.mixed_precision == "bf16"
    bf16.run()
    fp32 = scenario_engine("lm", overrides={"precision": "fp32", "max_steps": 1})
    assert fp32.precision == "float32" and fp32.accelerator.mixed_precision == "no"
    fp32.run()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
