"""A write the machine refuses (disk full, the per-file size limit) ends with one message that names the
output, about how many bytes it needed and what to free; the half-written temp is removed and nothing at
the output path looks finished. Each writer the stages use is tried: a checkpoint (safetensors), the
recovery engine's resumable state (torch.save), a metrics JSON, and a whole stage under DVC's command."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import models_dir
from stage_runner import run, run_on_small_filesystem, small_filesystem_available, stage, temps, write_params

pytestmark = pytest.mark.hostile(input="environment", expect=("message", "no-partial"))

needs_stories = pytest.mark.skipif(not (models_dir() / "stories260K").is_dir(), reason="stories260K not present (set LAYERFOLD_MODELS_DIR)")


def one_error(result) -> str:
    """The single line a refused write leaves on stderr (besides the stage's log lines), with no traceback."""
    assert result.code == 1, (result.code, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.errors) == 1, result.errors
    return result.errors[0]


@needs_stories
@pytest.mark.hostile(stage="base")
def test_checkpoint_over_the_file_size_limit(tmp_path):
    write_params(tmp_path)
    result = stage("base", tmp_path, file_size_limit=64 << 10)
    message = one_error(result)
    assert message.startswith("[base] OutputWriteError: Could not write artifacts/base: a file grew past the size limit")
    assert "it needs about 1015.8 KiB" in message and "at most 64.0 KiB per file (`ulimit -f`)" in message  # the weights in float32
    assert "ulimit -f unlimited" in message
    assert not (tmp_path / "artifacts" / "base").exists() and not temps(tmp_path)


@needs_stories
@pytest.mark.hostile(stage="base")
@pytest.mark.skipif(not small_filesystem_available(), reason="no private tmpfs here (needs unshare with user namespaces)")
def test_checkpoint_on_a_full_disk(tmp_path):
    params = write_params(tmp_path / "params")
    seed = {"params.yaml": (tmp_path / "params" / "params.yaml").read_bytes()}
    result = run_on_small_filesystem(["-m", "pipeline.base"], tmp_path / "run", "256k", seed)
    message = one_error(result)
    assert params["model"]["storage_dtype"] == "float32"  # 1015.8 KiB of weights for 256 KiB of disk
    assert message.startswith("[base] OutputWriteError: Could not write artifacts/base: the disk is full.")
    assert "It needs about 1015.8 KiB" in message and "is free on the filesystem holding" in message
    assert "dvc gc --workspace" in message and "(at least " in message
    left = tmp_path / "run" / "after"
    assert not (left / "artifacts" / "base").exists() and not temps(left)


# The recovery engine's resumable state, written as the recover stage writes it (torch.save through
# atomic_file), on a tiny model: the state (weights + AdamW moments) is far over 32 KiB.
ENGINE_STATE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from layerfold.io import install_error_hook
    from layerfold.recovery import RecoveryEngine
    from conftest import tiny_model
    sys.path.insert(0, str(Path(sys.argv[1])))
    from test_engine import recovery_cfg, removed, tokens

    install_error_hook("recover")
    teacher = tiny_model("llama")
    student, plan = removed(teacher, [1, 2])
    cfg = recovery_cfg("distill", max_steps=4, checkpoint_every=2, batch_size=2)
    RecoveryEngine(student, teacher, plan, cfg, tokens(8), tokens(2), state_dir=Path("state"), progress=False).run()
""")


@pytest.mark.hostile(stage="recover")
def test_resumable_state_over_the_file_size_limit(tmp_path):
    from conftest import REPO

    (tmp_path / "engine.py").write_text(ENGINE_STATE)
    result = run(["engine.py", str(REPO / "tests" / "recovery")], tmp_path, file_size_limit=32 << 10)
    message = one_error(result)
    assert message.startswith("[recover] OutputWriteError: Could not write state/state.pt: a file grew past the size limit")
    needed = int(float(message.split("it needs about ")[1].split(" KiB")[0]) * 1024)
    assert needed > 32 << 10
    assert not (tmp_path / "state" / "state.pt").exists() and not temps(tmp_path)


METRICS = textwrap.dedent("""
    from layerfold.io import install_error_hook, write_json
    install_error_hook("compress")
    write_json("metrics/compress.json", {"removed": list(range(400))})
""")


@pytest.mark.hostile(stage="compress")
def test_metrics_json_over_the_file_size_limit_names_the_exact_bytes(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "compress.json").write_text('{"earlier": true}\n')
    (tmp_path / "write.py").write_text(METRICS)
    result = run(["write.py"], tmp_path, file_size_limit=1000)
    expected = len(json.dumps({"removed": list(range(400))}, indent=2)) + 1
    message = one_error(result)
    assert f"Could not write metrics/compress.json: a file grew past the size limit: it needs about {expected / 1024:.1f} KiB" in message
    assert json.loads((tmp_path / "metrics" / "compress.json").read_text()) == {"earlier": True}  # the old file stays whole
    assert not temps(tmp_path)


@pytest.mark.hostile(stage="any", expect=("message", "no-partial", "traceback-for-bugs"))
def test_other_failures_inside_an_atomic_write_keep_their_traceback(tmp_path):
    (tmp_path / "bug.py").write_text(textwrap.dedent("""
        from layerfold.io import atomic_dir, install_error_hook
        install_error_hook("capture")
        with atomic_dir("artifacts/capture") as tmp:
            (tmp / "stats.json").write_text("{}")
            {}["missing"]
    """))
    result = run(["bug.py"], tmp_path)
    assert result.code == 1 and "Traceback" in result.stderr and "KeyError: 'missing'" in result.stderr
    assert not (tmp_path / "artifacts" / "capture").exists() and not temps(tmp_path)


@pytest.mark.hostile(stage="any")
@pytest.mark.skipif(not small_filesystem_available(), reason="no private tmpfs here (needs unshare with user namespaces)")
def test_read_only_filesystem_is_named(tmp_path):
    seed = {"metrics/compress.json": b'{"earlier": true}\n', "write.py": METRICS.encode()}
    result = run_on_small_filesystem(["write.py"], tmp_path, "64k", seed, read_only=True)
    message = one_error(result)
    assert message.startswith("[compress] OutputWriteError: Could not write metrics/compress.json: Read-only file system.")
    assert "Make metrics writable" in message
    assert json.loads((tmp_path / "after" / "metrics" / "compress.json").read_text()) == {"earlier": True}
