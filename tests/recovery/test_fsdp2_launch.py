"""End-to-end healing of a model that no process holds whole: ``recovery.distributed=fsdp2`` under ``accelerate launch``.

Two CPU processes (gloo) started by ``accelerate launch --multi_gpu --num_processes 2`` (this file is also the
worker script). Each loads the teacher and the student checkpoints through :func:`load_for_launch`: the main
process into host memory, the other with its parameters on the meta device (nothing read). The engine shards
both models from the main process's copy, so each process ends up holding about half of each. Scenarios:
LoRA with the LM loss plus logit KD, and every kept layer trained on logit KD alone (tied embeddings), the
latter also killed after a checkpoint and resumed by a new launch-side engine. Each is compared with one
process running the same global batch on whole models.

accelerate enables FSDP for GPU process groups only; as in ``test_distributed.py``, the worker puts its
process-wide state into FSDP2 mode on the CPU process group (the engine's own code path is unchanged).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest, when accelerate runs this file as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_distributed import compared, force_fsdp2_on_cpu, recovery_cfg, tiny_llama, tokens  # noqa: E402

from layerfold.models import save_checkpoint  # noqa: E402
from layerfold.models.adapters import get_adapter  # noqa: E402
from layerfold.recovery import RecoveryEngine  # noqa: E402
from layerfold.recovery.distributed import is_sharded, load_for_launch, process_device  # noqa: E402
from layerfold.surgery import LayerPlan, remove_layers  # noqa: E402

SCENARIOS = {
    # LoRA on every kept layer; next-token loss plus KL to the teacher's logits
    "lora_kd": dict(mode="lora", remove=[2], tied=False,
                    overrides={"distributed": "fsdp2", "end_to_end": {"lm_weight": 1.0, "kd_weight": 1.0, "kd_temperature": 2.0}}),
    # every kept layer trains on logit KD alone; tied input and output embeddings
    "kd": dict(mode="lm", remove=[1, 2], tied=True,
               overrides={"distributed": "fsdp2", "trainable": "layers", "end_to_end": {"lm_weight": 0.0, "kd_weight": 1.0}}),
}
KILLED_AT = ("end_to_end", 3)


def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(128)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t3")


def scenario_models(name: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    spec = SCENARIOS[name]
    teacher = tiny_llama(spec["tied"])
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)
    plan = LayerPlan(get_adapter(teacher).num_layers(teacher))
    remove_layers(student, spec["remove"])
    plan.remove(spec["remove"])
    return teacher, student, {**plan.to_json(), "details": {}}


def write_checkpoints(out: Path) -> None:
    for name in SCENARIOS:
        teacher, student, _ = scenario_models(name)
        save_checkpoint(teacher, tokenizer(), out / name / "teacher", dtype=torch.float32)
        save_checkpoint(student, tokenizer(), out / name / "student", dtype=torch.float32)


def engine_for(name: str, teacher, student, **kwargs) -> RecoveryEngine:
    spec = SCENARIOS[name]
    cfg = recovery_cfg(spec["mode"], **spec["overrides"], **kwargs.pop("overrides", {}))
    _, _, plan = scenario_models(name)
    return RecoveryEngine(student, teacher, plan, cfg, tokens(27, 1), tokens(4, 2), progress=False,
                          train_device=torch.device("cpu"), **kwargs)


def local_share(model: torch.nn.Module) -> float:
    """The share of ``model``'s elements this process holds (its shards of sharded parameters)."""
    held = sum((p.to_local() if is_sharded(p) else p).numel() for p in model.parameters())
    return held / sum(p.numel() for p in model.parameters())


# -- the worker: `accelerate launch --multi_gpu --num_processes 2 tests/recovery/test_fsdp2_launch.py OUT` ------------
def worker(out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    process_device(torch.device("cpu"))  # the process group, as the recover stage starts it
    force_fsdp2_on_cpu()
    results = {}

    def launch_engine(name: str, **kwargs) -> tuple[RecoveryEngine, dict]:
        spec = SCENARIOS[name]
        cfg = recovery_cfg(spec["mode"], **spec["overrides"])
        teacher, _ = load_for_launch(out / name / "teacher", torch.device("cpu"), torch.float32, cfg, 2)
        student, _ = load_for_launch(out / name / "student", torch.device("cpu"), torch.float32, cfg, 2)
        teacher.requires_grad_(False)
        loaded = {"teacher_meta": all(p.is_meta for p in teacher.parameters()),
                  "student_meta": all(p.is_meta for p in student.parameters())}
        engine = engine_for(name, teacher, student, **kwargs)
        return engine, {**loaded, "teacher_share": local_share(engine.teacher), "student_share": local_share(engine.student)}

    for name in SCENARIOS:
        engine, loaded = launch_engine(name)
        model, summary = engine.run()
        results[name] = {**loaded, "curve": engine.curve, "distributed": summary["distributed"], "processes": summary["processes"],
                         "weights": None if model is None else {n: t.detach().clone() for n, t in model.state_dict().items()}}

    class Killed(Exception):
        pass

    def kill(phase: str, step: int) -> None:
        if (phase, step) == KILLED_AT:
            raise Killed

    state_dir = out / "state-kd"
    engine, _ = launch_engine("kd", state_dir=state_dir, on_step=kill, overrides={"checkpoint_every": 2})
    try:
        engine.run()
    except Killed:
        pass
    written = (state_dir / "state.pt").exists()
    engine, _ = launch_engine("kd", state_dir=state_dir, overrides={"checkpoint_every": 2})
    model, summary = engine.run()
    results["kd_resumed"] = {"curve": engine.curve, "state_written": written, "state_left": (state_dir / "state.pt").exists(),
                             "weights": None if model is None else {n: t.detach().clone() for n, t in model.state_dict().items()}}
    torch.save(results, out / f"rank{rank}.pt")


# -- the tests ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, one_process) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("fsdp2_launch")
    write_checkpoints(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", __file__, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)}


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict]:
    """The same scenarios in this single process, on whole models, one thread as each worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        for name in SCENARIOS:
            teacher, student, _ = scenario_models(name)
            initial = {n: t.clone() for n, t in student.state_dict().items()}
            engine = engine_for(name, teacher, student)
            model, summary = engine.run()
            results[name] = {"curve": engine.curve, "distributed": summary["distributed"], "initial": initial,
                             "weights": {n: t.detach().clone() for n, t in model.state_dict().items()}}
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sharded_models_train_as_one_process_with_the_same_global_batch(two_processes, one_process, name):
    """Loss per step, learning rates and final weights (LoRA merged, gathered on the main process) match one process."""
    main, other = two_processes[0][name], two_processes[1][name]
    assert (main["processes"], main["distributed"], one_process[name]["distributed"]) == (2, "fsdp2", "none")
    compared(one_process[name], main)
    assert other["weights"] is None and other["curve"] == main["curve"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_no_process_holds_either_model_whole(two_processes, name):
    """Only the main process read the checkpoints; after sharding each process holds about half of the teacher and
    of the student (the small unsharded remainder: norms' and biases' rows split unevenly are still split)."""
    main, other = two_processes[0][name], two_processes[1][name]
    assert not main["teacher_meta"] and not main["student_meta"]
    assert other["teacher_meta"] and other["student_meta"]  # built from the config, nothing read
    for rank in (main, other):
        assert 0.4 < rank["teacher_share"] < 0.6 and 0.4 < rank["student_share"] < 0.6, rank


def test_a_killed_sharded_run_resumes_to_the_same_weights(two_processes, one_process):
    """Killed in step 3 after the checkpoint at step 2 (written by the main process, gathered from the shards) and
    resumed by a new engine on freshly loaded models: the run ends as one uninterrupted process does."""
    resumed, other = two_processes[0]["kd_resumed"], two_processes[1]["kd_resumed"]
    assert resumed["state_written"] and not resumed["state_left"]
    compared(one_process["kd"], resumed)
    assert other["weights"] is None


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
