"""Peak host RAM of layer-local distillation against dataset size: teacher targets on the fly keep it O(batch).

LLM-Streamline's released MSE path stores every training block's hidden states (input and output of
the pruned block) in host memory, which grows with the dataset (past 1 TB in its issue #5). layerfold's
engine runs the teacher inside the training loop instead. This benchmark trains the same replacement
on x1 and x4 the tokens, each in a fresh process, and records the process's peak RSS, its RSS right
before training, and what storing the teacher's span input and output for the whole dataset in fp32
would need.

    python benchmarks/recovery_host_ram.py            # CPU, tiny random Llama; writes benchmarks/results/recovery_host_ram_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, LAYERS, VOCAB, SEQ = 256, 8, 4096, 256


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_run(blocks: int) -> dict:
    """Train layer 2 to stand in for original layers 2-4 on ``blocks`` random blocks; report memory."""
    import copy

    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaConfig

    from layerfold.config import RecoveryConfig
    from layerfold.recovery import RecoveryEngine
    from layerfold.surgery import LayerPlan, remove_layers

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=4)
    teacher = AutoModelForCausalLM.from_config(config).eval()
    student = copy.deepcopy(teacher)
    plan = LayerPlan(LAYERS)
    remove_layers(student, [3, 4])
    plan.remove([3, 4])
    data = torch.randint(0, VOCAB, (blocks, SEQ), generator=torch.Generator().manual_seed(1))
    cfg = OmegaConf.merge(OmegaConf.structured(RecoveryConfig), {
        "name": "distill", "local": {"enabled": True}, "batch_size": 8, "epochs": 1, "log_every": 1000, "checkpoint_every": 10**6,
    })
    before = rss_mib()
    started = time.perf_counter()
    engine = RecoveryEngine(student, teacher, {**plan.to_json(), "details": {}}, cfg, data, data[:8], progress=False)
    _, summary = engine.run()
    seconds = time.perf_counter() - started
    tokens = data.numel()
    return {
        "blocks": blocks,
        "tokens": tokens,
        "rss_before_training_mib": round(before, 1),
        "peak_rss_mib": round(rss_mib(), 1),
        "training_overhead_mib": round(rss_mib() - before, 1),
        "stored_hidden_states_would_need_mib": round(2 * tokens * HIDDEN * 4 / 2**20, 1),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(summary["phases"][0]["tokens"] / summary["phases"][0]["seconds"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=64, help="blocks of 256 tokens at x1")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_run(args.child)))
        return
    runs = []
    for scale in (1, 4):
        out = subprocess.run([sys.executable, __file__, "--child", str(args.blocks * scale)], capture_output=True, text=True, check=True)
        runs.append({"scale": scale, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(runs[-1], flush=True)
    result = {
        "benchmark": "recovery_host_ram",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": f"cpu ({platform.machine()}, 2 threads)",
        "model": f"random Llama, {LAYERS} layers, hidden {HIDDEN}, vocab {VOCAB}, fp32; layer 2 trained for layers 2-4",
        "seq_len": SEQ,
        "runs": runs,
        "peak_rss_growth_x4_vs_x1_mib": round(runs[1]["peak_rss_mib"] - runs[0]["peak_rss_mib"], 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recovery_host_ram_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
