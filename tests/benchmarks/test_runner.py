"""benchmarks/run.py collects scripts' records into one table and survives missing, failing and old-style
scripts; benchmarks/layer_removal_speed.py measures a tiny saved checkpoint on CPU and writes its record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS, load_benchmark
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from layerfold.models import save_checkpoint

run = load_benchmark("run")

FAKE = '''
import argparse, json
parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--seconds", type=float)
args = parser.parse_args()
record = {RECORD}
json.dump(record, open(args.out, "w"))
'''


def _fake_record(name: str, seconds: float, met: bool) -> dict:
    return {
        "benchmark": name,
        "environment": {"date": "2026-11-22", "device": "cpu (test)"},
        "settings": {"shape": "tiny"},
        "rows": [{"name": f"{name} row", "seconds": seconds, "seconds_min": seconds / 2, "seconds_max": seconds * 2, "repeats": 3,
                  "tokens": 1024, "tokens_per_s": round(1024 / seconds, 1), "mfu": 0.125, "peak_gpu_mib": 2048.0,
                  "peak_gpu_over_weights": 1.5, "peak_host_mib": 512.0, "target": "fast", "met": met}],
        "notes": f"{name} measured nothing real",
    }


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "alpha.py").write_text(FAKE.replace("{RECORD}", repr(_fake_record("alpha", 2.0, True))))
    (folder / "beta.py").write_text(FAKE.replace("{RECORD}", repr(_fake_record("beta", 0.5, False))))
    (folder / "broken.py").write_text("import sys\nprint('loading weights...')\nsys.exit('CUDA out of memory')\n")
    (folder / "old_style.py").write_text(FAKE.replace("{RECORD}", repr({"benchmark": "old", "prefill_speedup": 1.9})))
    return folder


def test_runner_collects_records_and_reports_missing_and_failing_scripts(scripts, tmp_path):
    suite = {
        "alpha": run.Benchmark("alpha.py --out {out}", 60),
        "missing": run.Benchmark("not_written_yet.py --out {out}", 60),
        "broken": run.Benchmark("broken.py --out {out}", 60),
        "beta": run.Benchmark("beta.py --seconds 1 --out {out}", 60),
        "old_style": run.Benchmark("old_style.py --out {out}", 60),
    }
    out = tmp_path / "results"
    entries = run.run_suite(suite, out, "cpu", scripts_dir=scripts)
    status = {e["name"]: e["status"] for e in entries}
    assert status == {"alpha": "ok", "missing": "missing", "broken": "failed", "beta": "ok", "old_style": "ok"}
    broken = next(e for e in entries if e["name"] == "broken")
    assert broken["returncode"] == 1 and "CUDA out of memory" in broken["log_tail"]
    assert (out / "logs" / "broken_cpu.log").read_text().startswith("loading weights...")
    assert json.loads((out / "alpha_cpu.json").read_text())["benchmark"] == "alpha"
    assert not (out / "broken_cpu.json").exists() and not list(out.glob(".*"))  # nothing half-written left behind

    records, skipped = run.split_entries(entries)
    assert [r["benchmark"] for r in records] == ["alpha", "beta"]
    assert any(s.startswith("missing: missing") for s in skipped) and "broken: failed (exit code 1: CUDA out of memory)" in skipped
    assert any(s.startswith("old_style: old-style") for s in skipped)
    table = run.markdown(records, skipped)
    assert "date: 2026-11-22; device: cpu (test)" in table
    assert "| alpha | alpha row | tiny | 1,024 | 2 [1–4] | 512.0 | 12.5 % | 2,048 (×1.50) | 512 | fast | yes |" in table
    assert "| beta | beta row | tiny | 1,024 | 0.5 [0.25–1] | 2,048.0 | 12.5 % | 2,048 (×1.50) | 512 | fast | **no** |" in table
    assert "- **alpha**: alpha measured nothing real" in table


def test_runner_times_out_a_script_and_goes_on(tmp_path):
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(30)\n")
    entry = run.run_one("slow", run.Benchmark("slow.py --out {out}", 1), tmp_path / "out", "cpu", scripts_dir=tmp_path)
    assert entry["status"] == "timeout" and "1 s limit" in entry["detail"]


def test_table_from_files_skips_old_style_results(scripts, tmp_path, capsys):
    new = tmp_path / "new.json"
    new.write_text(json.dumps(_fake_record("alpha", 2.0, True)))
    collected = tmp_path / "latest_cpu.json"
    collected.write_text(json.dumps({"suite": "cpu", "benchmarks": [
        {"name": "beta", "status": "ok", "record": _fake_record("beta", 0.5, False)},
        {"name": "gone", "status": "missing", "detail": "benchmarks/gone.py does not exist"},
    ]}))
    old = tmp_path / "cpu_smollm2_remove8.json"
    old.write_text(json.dumps({"dense": {}, "prefill_speedup": 1.26}))
    assert run.main(["--table", str(new), str(collected), str(old)]) == 0
    table = capsys.readouterr().out
    assert "| alpha | alpha row |" in table and "| beta | beta row |" in table
    assert "latest_cpu.json: gone: missing" in table
    assert f"{old}: old-style result without rows, skipped" in table


def test_every_registered_command_names_its_output():
    for suite, benchmarks in run.SUITES.items():
        for name, benchmark in benchmarks.items():
            assert "--out {out}" in benchmark.command, f"{suite}/{name}"
            assert 0 < benchmark.timeout_s <= 1800
    assert run.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3" and run.device_slug("cpu (x86_64, 2 threads)") == "cpu"


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    config = TINY_CONFIGS["llama"]()
    model = AutoModelForCausalLM.from_config(config).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0")))
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --threads sets it for the whole process


def test_layer_removal_speed_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, restore_threads):
    speed = load_benchmark("layer_removal_speed")
    out = tmp_path / "speed.json"
    speed.main(["--checkpoint", str(tiny_checkpoint), "--remove", "2", "--settings", "1x16:4", "--repeats", "2", "--device", "cpu",
                "--threads", "1", "--out", str(out)])  # one thread: two spin-waiting threads crawl on a busy machine
    record = json.loads(out.read_text())
    assert set(record) >= {"benchmark", "environment", "settings", "rows", "notes"} and record["benchmark"] == "layer_removal_speed"
    settings = record["settings"]
    assert settings["removed_layers"] == [1, 2] and (settings["dense_layers"], settings["compressed_layers"]) == (4, 2)
    assert [r["name"] for r in record["rows"]] == ["prefill dense (4L)", "decode dense (4L)", "prefill compressed (2L)", "decode compressed (2L)"]
    prefill, decode = record["rows"][2], record["rows"][3]
    assert prefill["shape"] == "1x16" and prefill["tokens"] == 16 and decode["tokens"] == 4 and prefill["repeats"] == 2
    assert 1.0 < prefill["speedup_bound"] < 2.0 and 1.0 < decode["speedup_bound"] < 2.0  # below the 4/2 layer ratio
    assert prefill["seconds_min"] <= prefill["seconds"] <= prefill["seconds_max"]
    assert prefill["met"] is (not prefill["measurement_suspect"])
    assert record["notes"].startswith("Dense and compressed alternate round-robin")
    table = run.markdown(*run.load_for_table([out]))
    assert "| layer_removal_speed | decode compressed (2L) | 1x16:4 | 4 |" in table


def test_layer_removal_speed_rejects_a_bad_setting():
    speed = load_benchmark("layer_removal_speed")
    with pytest.raises(SystemExit, match="BxT:N"):
        speed.parse_settings("8x512")
