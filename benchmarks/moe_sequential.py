"""Benchmark: depth-pruning a 100B+ mixture-of-experts model on one GPU, layer by layer.

    python benchmarks/moe_sequential.py --shape qwen3-235b-a22b deepseek-v3 --out benchmarks/results/moe_sequential_h200.json
    python benchmarks/moe_sequential.py --shape tiny-qwen3-moe tiny-deepseek-v3 --calib 4x32 --windows 2 --seq-len 32   # CPU smoke run

Each shape's decoder layers are generated on the fly by ``SeededLayerLoader`` (weights drawn per layer
on the compute device: a 470 GB or 1.3 TB bf16 checkpoint fits neither the GPU nor the disk), run over
every sequence and freed, through the same code the pipeline's ``hardware=sequential`` runs:

0. ``parity``: on tiny seeded MoE models (Qwen3-MoE, DeepSeek-V3 with a dense first layer) in fp32 on
   the device, the layer-major NLL against the resident model, and ShortGPT's plan both ways;
1. ``generate layer``: one MoE decoder layer's weights drawn on the device;
2. ``capture``: boundary statistics (adjacent-boundary token cosine, ``max_distance=1``) over the
   calibration blocks;
3. ``compress``: ShortGPT (``layerfold.methods``, layer-major context) removes a quarter of the layers;
4. ``perplexity dense`` / ``perplexity pruned``: next-token NLL of both stacks over the evaluation
   windows (the pruned one through ``PlannedLayerLoader``, built per layer, never whole).

Random weights and random token ids (seeded): real time and memory, never accuracy.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from common import Timing, add_layer_major_args, environment, forward_flops, reset_peak_gpu, row, write_result

from layerfold.capture import BoundaryStatistics
from layerfold.execution import LayerMajorRunner, PlannedLayerLoader, SeededLayerLoader, TokenNLL, materialise_model
from layerfold.execution.loaders import meta_model
from layerfold.execution.loss import token_nll as resident_token_nll
from layerfold.methods import MethodContext, compress
from layerfold.models import get_adapter, resolve_device, resolve_dtype
from layerfold.models.tiny import tiny_config

RESULTS = Path(__file__).resolve().parent / "results"


def shape_config(shape: str) -> Any:
    """Published config.json values of the MoE models (random weights of these shapes: real time and memory only)."""
    from transformers import DeepseekV3Config, Qwen3MoeConfig

    if shape == "qwen3-235b-a22b":
        return Qwen3MoeConfig(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=94,
                              num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                              vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, norm_topk_prob=True,
                              decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
    if shape == "deepseek-v3":
        return DeepseekV3Config()  # the class defaults are DeepSeek-V3's (671B: 61 layers, 3 dense, 256 routed experts)
    if shape.startswith("tiny-"):
        return tiny_config(shape.removeprefix("tiny-").replace("-", "_"))
    raise SystemExit(f"Unknown shape {shape!r}; choose qwen3-235b-a22b, deepseek-v3, tiny-qwen3-moe, tiny-deepseek-v3.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=["qwen3-235b-a22b", "deepseek-v3"])
    parser.add_argument("--calib", default="16x2048", help="calibration blocks NxT (default 16x2048)")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per evaluation window (default 2048)")
    parser.add_argument("--remove", type=float, default=0.25, help="share of the layers ShortGPT removes (default 0.25)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--logits-chunk", type=int, default=1024)
    add_layer_major_args(parser, "moe_sequential")
    args = parser.parse_args(argv)
    match = re.fullmatch(r"(\d+)x(\d+)", args.calib)
    if not match:
        raise SystemExit(f"--calib {args.calib!r} is not NxT, e.g. 16x2048.")
    args.calib = (int(match.group(1)), int(match.group(2)))
    return args


def random_ids(count: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(seed))


def hardware(args: argparse.Namespace) -> dict[str, Any]:
    return {"mode": "sequential", "activations": args.activations, "prefetch": not args.no_prefetch,
            "batch_size": args.batch_size, "logits_chunk": args.logits_chunk}


def parity_row(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Tiny MoE models in fp32 on the device: layer-major NLL vs resident, and ShortGPT's plan both ways."""
    reset_peak_gpu(device)
    began = time.perf_counter()
    differences, plans_equal = {}, {}
    for family in ("qwen3_moe", "deepseek_v3"):
        loader = SeededLayerLoader(tiny_config(family), seed=args.seed, dtype=torch.float32, generator_device="cpu")
        blocks = random_ids(8, 32, loader.config.vocab_size, args.seed + 3)
        model = materialise_model(loader, device, torch.float32).eval()
        reference, _ = resident_token_nll(model, blocks, batch_size=2)
        run = LayerMajorRunner(loader, device, torch.float32, activations="host", prefetch=True, batch_size=2)
        acts = run.embed(blocks)
        head = TokenNLL(run.final_norm(), run.lm_head(), acts, run.num_layers, chunk_tokens=50)
        run.run_layers(acts, on_boundary=head)
        differences[family] = abs(head.nll - reference) / reference
        method = {"name": "shortgpt", "num_remove": 1}
        resident = compress(MethodContext(model, None, blocks, batch_size=2), method)
        layered = compress(MethodContext.layer_major(loader, None, blocks, hardware(args), device, torch.float32, batch_size=2), method)
        plans_equal[family] = resident["layers"] == layered["layers"]
    met = max(differences.values()) <= 1e-5 and all(plans_equal.values())
    return row("parity", timing=Timing([time.perf_counter() - began]), device=device, met=met,
               target="relative NLL difference <= 1e-5 and the same ShortGPT plan", relative_nll_difference=differences,
               same_plan=plans_equal)


def nll_row(name: str, loader, windows: torch.Tensor, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            params: int, weights_mib: float) -> dict[str, Any]:
    reset_peak_gpu(device)
    began = time.perf_counter()
    run = LayerMajorRunner(loader, device, dtype, activations=args.activations, prefetch=not args.no_prefetch, batch_size=args.batch_size)
    acts = run.embed(windows)
    head = TokenNLL(run.final_norm(), run.lm_head(), acts, run.num_layers, args.logits_chunk)
    run.run_layers(acts, on_boundary=head)
    config = loader.config
    flops = forward_flops(params, windows.numel(), run.num_layers, config.hidden_size, windows.shape[1], config.vocab_size, head.count)
    return row(name, timing=Timing([time.perf_counter() - began]), tokens=windows.numel(), flops=flops, device=device,
               weights_mib=weights_mib, perplexity=round(math.exp(head.nll / head.count), 3), layers=run.num_layers,
               execution=run.report.as_dict())


def active_parameters(config: Any, skeleton: torch.nn.Module) -> tuple[int, int]:
    """(all, active per token) parameters of the decoder layers: a token runs ``num_experts_per_tok`` routed experts."""
    adapter = get_adapter(skeleton)
    total = active = 0
    for layer in adapter.get_layers(skeleton):
        for name, p in layer.named_parameters():
            total += p.numel()
            if name.startswith(adapter.experts + "."):
                active += p.numel() * config.num_experts_per_tok // p.shape[0]
            else:
                active += p.numel()
    return total, active


def run_shape(shape: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    config = shape_config(shape)
    loader = SeededLayerLoader(config, seed=args.seed, dtype=dtype)
    skeleton = meta_model(config)
    total, active = active_parameters(config, skeleton)
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights_mib = sum(p.numel() for p in skeleton.parameters()) * itemsize / 2**20
    layers = config.num_hidden_layers
    print(f"{shape}: {layers} layers, {weights_mib / 1024:.0f} GiB of weights in {dtype} (never resident), "
          f"{active / 1e9:.1f}B of {total / 1e9:.1f}B decoder parameters active per token", flush=True)
    rows = []
    reset_peak_gpu(device)
    moe_layer = next(i for i, layer in enumerate(get_adapter(skeleton).get_layers(skeleton)) if any("experts" in n for n, _ in layer.named_parameters()))
    began = time.perf_counter()
    state = loader.load_layer(moe_layer, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    layer_mib = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    del state
    rows.append(row("generate layer", timing=Timing([time.perf_counter() - began]), device=device, layer=moe_layer, layer_mib=round(layer_mib, 1)))

    calib = random_ids(*args.calib, config.vocab_size, args.seed + 1)
    windows = random_ids(args.windows, args.seq_len, config.vocab_size, args.seed + 2)
    reset_peak_gpu(device)
    began = time.perf_counter()
    ctx = MethodContext.layer_major(loader, None, calib, hardware(args), device, dtype, batch_size=args.batch_size)
    stats = BoundaryStatistics(layers + 1, max_distance=1)
    run = ctx.stack.runner
    run.run_layers(run.embed(calib), on_boundary=stats.add)
    flops = forward_flops(active, calib.numel(), layers, config.hidden_size, calib.shape[1])
    rows.append(row("capture", timing=Timing([time.perf_counter() - began]), tokens=calib.numel(), flops=flops, device=device,
                    weights_mib=weights_mib, execution=run.report.as_dict()))
    reset_peak_gpu(device)
    began = time.perf_counter()
    ctx.stats = stats
    num_remove = max(1, round(args.remove * layers))
    plan = compress(ctx, {"name": "shortgpt", "num_remove": num_remove})
    rows.append(row("compress", timing=Timing([time.perf_counter() - began]), device=device, method="shortgpt", num_remove=num_remove,
                    removed=plan["removed"], layers_after=len(plan["layers"]), config_after={
                        k: getattr(ctx.model.config, k) for k in ("num_hidden_layers", "first_k_dense_replace", "mlp_only_layers")
                        if hasattr(ctx.model.config, k)}))
    rows.append(nll_row("perplexity dense", loader, windows, args, device, dtype, active, weights_mib))
    pruned = PlannedLayerLoader(loader, plan)
    rows.append(nll_row("perplexity pruned", pruned, windows, args, device, dtype, active * len(plan["layers"]) // layers, weights_mib))
    peak_gpu = max((r["peak_gpu_mib"] or 0) for r in rows)
    return {"shape": shape, "layers": layers, "weights_gib": round(weights_mib / 1024, 1), "decoder_params": total,
            "active_decoder_params": active, "peak_gpu_mib": peak_gpu, "peak_host_mib": max(r["peak_host_mib"] for r in rows),
            "rows": rows, "block_influence": [round(float(v), 6) for v in (1 - torch.diagonal(stats.cosine, offset=1))]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    started = time.perf_counter()
    parity = parity_row(device, args)
    print(parity, flush=True)
    shapes = [run_shape(shape, args, device, dtype) for shape in args.shape]
    total = time.perf_counter() - started
    notes = " ".join(
        f"{s['shape']} ({s['layers']} layers, {s['weights_gib']} GiB of {str(dtype).replace('torch.', '')} weights) depth-pruned by "
        f"ShortGPT to {s['rows'][2]['layers_after']} layers layer by layer: peak GPU {s['peak_gpu_mib'] / 1024:.1f} GiB, "
        f"peak host {s['peak_host_mib'] / 1024:.1f} GiB."
        for s in shapes
    )
    record = {"benchmark": "moe_sequential", "environment": environment(device),
              "settings": dict(calib="x".join(map(str, args.calib)), windows=args.windows, seq_len=args.seq_len, remove=args.remove,
                               batch_size=args.batch_size, activations=args.activations, prefetch=not args.no_prefetch,
                               dtype=str(dtype).replace("torch.", ""), seed=args.seed, max_distance=1, tokens="seeded random ids",
                               weights="seeded random, generated per layer on the compute device"),
              "rows": [parity], "shapes": shapes, "seconds": round(total, 1), "notes": notes}
    write_result(args.out or RESULTS / f"moe_sequential_{device.type}.json", record)
    return record


if __name__ == "__main__":
    main()
