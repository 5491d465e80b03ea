"""Interrupted writes leave nothing that looks finished, their leftovers are cleaned, and runs repeat exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model

from layerfold.io import atomic_dir, remove_stale_temps
from layerfold.methods import MethodContext, compress

pytestmark = pytest.mark.hostile(input="environment", stage="any", expect=("no-partial",))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = tmp_path / f".base.tmp-{dead_pid()}-abc"
    legacy = tmp_path / ".capture.tmp-k2j3h4"  # the form without a pid
    ours = tmp_path / f".compressed.tmp-{os.getpid()}-xyz"
    stale_file = tmp_path / f".compress.json.tmp-{dead_pid()}-q"
    for folder in (dead, legacy, ours):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    stale_file.write_text("{")
    removed = remove_stale_temps([tmp_path, tmp_path / "absent"])
    assert sorted(removed) == sorted([dead, legacy, stale_file])
    assert ours.exists() and not dead.exists() and not legacy.exists() and not stale_file.exists()


def test_a_stage_start_cleans_leftovers(tmp_path, monkeypatch):
    from layerfold import stage

    leftover = tmp_path / "artifacts" / f".base.tmp-{dead_pid()}-abc"
    leftover.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    try:
        stage.start("capture", params_path=tmp_path / "missing.yaml")
    except Exception:
        pass  # no params here: cleaning comes first
    assert not leftover.exists()


def test_sigint_during_an_atomic_write_leaves_nothing(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from layerfold.io import atomic_dir
        with atomic_dir({str(tmp_path / 'out')!r}) as tmp:
            (tmp / "weights").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    # Ctrl-C's default action in the child even where this test runs as a background job (which ignores SIGINT)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temp


def test_a_failed_block_leaves_the_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("kept")
    try:
        with atomic_dir(out) as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old").read_text() == "kept"


@pytest.mark.hostile(stage="compress", expect=("same-hashes",))
def test_sleb_twice_gives_the_same_plan_and_weights():
    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for _ in range(2):
        torch.manual_seed(123)  # a different global seed state must not matter either
        model = tiny_model("llama", seed=0)
        ctx = MethodContext(model, tokenizer=None, calibration=blocks, batch_size=2)
        plan = compress(ctx, {"name": "sleb", "num_remove": 1})
        results.append((plan, {k: v.clone() for k, v in model.state_dict().items()}))
    (plan_a, weights_a), (plan_b, weights_b) = results
    assert plan_a == plan_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
