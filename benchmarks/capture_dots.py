"""Benchmark: the kernel behind capture's token cosine -- per-token dot products of ring slots, three ways.

    python benchmarks/capture_dots.py                    # CUDA: hidden 4096 (Llama-2-7B), 8192 / 16384 tokens, 3 / 9 / 33 slots
    python benchmarks/capture_dots.py --tokens 256 --hidden 64 --slots 3 --repeats 3   # CPU smoke run

Capture keeps a batch's layer boundaries in a token-major ring ``[tokens, slots, hidden]`` and sums
cos(slot a, slot b) over tokens. The formulations timed (random bf16 states; every one checked against
an fp32 ``F.normalize`` + einsum reference, largest absolute difference of the token sums recorded):

- ``bmm``: what :class:`layerfold.capture.stats.BoundaryStatistics` does -- one batched matmul per
  token (``[slots, hidden] x [hidden, slots]``, fp32 output), norms from its diagonal;
- ``compiled``: the same arithmetic as one ``torch.compile`` reduction over hidden (CUDA only; its
  compile time is recorded apart);
- ``gram_splitk``: states normalised to bf16 first, then one Gram matrix of ``[slots, tokens x hidden]``
  split over 256 chunks of the long dimension (changes the numbers: the normalised states are rounded);
- ``copy_one_slot``: writing one boundary into the ring, for scale.

The ring's bytes over the median time give each formulation's effective read bandwidth.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import environment, write_result
from run import device_slug

from layerfold.models import resolve_device
from layerfold.models.devices import device_name

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return round(sorted(times)[len(times) // 2] * 1e3, 3)


def reference(states: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(states.float(), dim=-1)
    return torch.einsum("tah,tbh->ab", unit, unit).double()


def by_bmm(states: torch.Tensor) -> torch.Tensor:
    dots = torch.bmm(states, states.mT, out_dtype=torch.float32) if states.is_cuda else torch.bmm(states.float(), states.float().mT)
    norms = dots.diagonal(dim1=1, dim2=2).sqrt().clamp_min(1e-12)
    return (dots / (norms[:, :, None] * norms[:, None, :])).sum(0, dtype=torch.float64)


def by_reduction(states: torch.Tensor) -> torch.Tensor:
    wide = states.float()
    dots = (wide[:, :, None, :] * wide[:, None, :, :]).sum(-1)
    norms = dots.diagonal(dim1=1, dim2=2).sqrt().clamp_min(1e-12)
    return (dots / (norms[:, :, None] * norms[:, None, :])).sum(0, dtype=torch.float64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per batch (default 8192 16384 on CUDA, 256 on CPU)")
    parser.add_argument("--slots", type=int, nargs="+", default=[3, 9, 33], help="boundaries in the ring (default 3 9 33)")
    parser.add_argument("--hidden", type=int, help="hidden size (default 4096 on CUDA, 64 on CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    tokens_list, hidden = args.tokens or ([8192, 16384] if cuda else [256]), args.hidden or (4096 if cuda else 64)
    compiled = torch.compile(by_reduction, dynamic=False) if cuda else None
    rows = []
    for tokens in tokens_list:
        for slots in args.slots:
            states = torch.randn(tokens, slots, hidden, device=device, dtype=torch.bfloat16)
            ring_bytes = states.numel() * states.element_size()
            expected = reference(states)
            entry = {"name": f"T{tokens} S{slots}", "tokens": tokens, "slots": slots, "hidden": hidden, "ring_mib": round(ring_bytes / 2**20, 1)}
            ways = {"bmm": lambda: by_bmm(states)}
            if compiled is not None:
                began = time.perf_counter()
                compiled(states)
                torch.cuda.synchronize(device)
                entry["compile_s"] = round(time.perf_counter() - began, 1)
                ways["compiled"] = lambda: compiled(states)
            unit = F.normalize(states.float(), dim=-1).to(torch.bfloat16).transpose(0, 1).contiguous().view(slots, -1)
            chunks = unit.view(slots, 256, -1).transpose(0, 1) if unit.shape[1] % 256 == 0 else unit[None]
            ways["gram_splitk"] = lambda: (torch.bmm(chunks, chunks.mT, out_dtype=torch.float32) if cuda
                                           else torch.bmm(chunks.float(), chunks.float().mT)).sum(0, dtype=torch.float64)
            for name, fn in ways.items():
                ms = median_ms(fn, device, args.repeats)
                entry[f"{name}_ms"] = ms
                entry[f"{name}_gb_per_s"] = round(ring_bytes / (ms / 1e3) / 1e9, 1)
                entry[f"{name}_max_abs_diff"] = float((fn() - expected).abs().max())
            entry["copy_one_slot_ms"] = median_ms(lambda: states[:, 0].clone(), device, args.repeats)
            rows.append(entry)
            print(entry, flush=True)
            del states, unit, chunks
    record = {"benchmark": "capture_dots", "environment": environment(device),
              "settings": {"tokens": tokens_list, "slots": args.slots, "hidden": hidden, "dtype": "bfloat16", "repeats": args.repeats},
              "rows": rows,
              "notes": "Median of the repeats after 3 warm-up calls; *_max_abs_diff: largest difference of the token sums of "
                       "cosines to an fp32 reference (sums over `tokens` tokens, so divide by tokens for a mean cosine)."}
    write_result(args.out or RESULTS / f"capture_dots_{device_slug(device_name(device))}.json", record)


if __name__ == "__main__":
    main()
