"""Parity with the released ReplaceMe and LinearPatch code (``python -m parity.methods_2025``).

The fold comparison must pass within what the two sides' difference in T explains and fail beyond it. With the
released code in the released directory (``python -m parity.methods_2025 fetch``; skipped otherwise), layerfold must
reproduce it on stories260K: the same block, the same fitted map to 1e-6, the same weights, the same patch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import models_dir

REPO = Path(__file__).resolve().parents[2]
STORIES = models_dir() / "stories260K"


from parity import adapters_2025, compare, linear_patch, released as released_code, replaceme, runner


def test_fold_comparison_allows_what_the_map_difference_explains_and_no_more() -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=generator, dtype=torch.float64).to(torch.bfloat16).double()
    t = torch.eye(8, dtype=torch.float64) + 0.1 * torch.randn(8, 8, generator=generator, dtype=torch.float64)
    nudged = t + 1e-3 * torch.randn(8, 8, generator=generator, dtype=torch.float64)
    released, ours = (t.T @ w).to(torch.bfloat16), (nudged.T @ w).to(torch.bfloat16)
    propagated = (t - nudged).abs().T @ w.abs()
    assert replaceme._fold_comparison(released, released.clone(), "w", torch.zeros_like(propagated))["passed"]
    assert replaceme._fold_comparison(released, ours, "w", propagated)["passed"]
    assert not replaceme._fold_comparison(released, ours, "w", torch.zeros_like(propagated))["passed"]  # T differs: not explained
    broken = ours.clone()
    broken[2, 3] += 0.5
    assert not replaceme._fold_comparison(released, broken, "w", propagated)["passed"]


def test_linear_patch_comparison_fails_on_another_scale() -> None:
    rotation = torch.eye(4, dtype=torch.float64)
    scale = torch.tensor([1.0, 1.5, 2.0, 0.5], dtype=torch.float64)
    state = {"patch": torch.diag(scale), "scale": scale, "rotation": rotation}
    outcome = lambda s, position=1: runner.Outcome({"window": [1, 3], "position": position}, s, {})  # noqa: E731
    same = linear_patch.compare_linear_patch({"released": outcome(state), "layerfold": outcome(dict(state))}, 1e-6)
    assert compare.verdict(same)
    other = {**state, "scale": scale * 1.1, "patch": torch.diag(scale * 1.1)}
    assert not compare.verdict(linear_patch.compare_linear_patch({"released": outcome(state), "layerfold": outcome(other)}, 1e-6))
    assert not compare.verdict(linear_patch.compare_linear_patch({"released": outcome(state), "layerfold": outcome(state, 2)}, 1e-6))


# Released code on stories260K --------------------------------------------------------------------

RELEASED_DIR = Path(os.environ.get("LAYERFOLD_RELEASED_DIR", released_code.DEFAULT_RELEASED_DIR)).expanduser()


@pytest.fixture(scope="module")
def stories_checkpoint(tmp_path_factory) -> Path:
    """stories260K as a checkpoint with the final norm's weight set to ones: the released code reads HF's post-norm last
    hidden state, layerfold the pre-norm stream; with a constant norm weight they differ by a positive scale per token,
    which no angle sees, so every block distance must agree."""
    if not STORIES.is_dir():
        pytest.skip("stories260K not present (set LAYERFOLD_MODELS_DIR)")
    from layerfold.models.llama2c import load_llama2c
    from layerfold.models.sources import save_checkpoint

    model, tokenizer = load_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.bin")
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
        # a last layer that changes the stream a lot, so the chosen block ends before it: a block ending at the last
        # layer fits the released code's target, HF's post-norm last hidden state (a documented, ungated difference)
        model.model.layers[-1].mlp.down_proj.weight.mul_(30.0)
    path = tmp_path_factory.mktemp("parity2025") / "stories"
    save_checkpoint(model, tokenizer, path, dtype=torch.bfloat16)  # bfloat16 weights: the released fold reloads in bfloat16
    return path


def needs(repository: str) -> None:
    if released_code.released_provenance(RELEASED_DIR, repository) is None:
        pytest.skip(f"released {adapters_2025.RELEASED[repository].repo} not in {RELEASED_DIR}; run `python -m parity.methods_2025 fetch`")


def failed(comparisons: list[dict]) -> list[str]:
    return [f"{c['name']}: {({k: v for k, v in c.items() if k != 'per_tensor_max_abs_diff'})}" for c in comparisons
            if c.get("gate", True) and not c["passed"]]


def test_replaceme_reproduces_the_released_least_squares(stories_checkpoint: Path, one_thread) -> None:
    needs("replaceme")
    blocks = torch.randint(3, 512, (16, 32), generator=torch.Generator().manual_seed(0))
    blocks[:, 0] = 1
    settings = adapters_2025.Settings(checkpoint=str(stories_checkpoint), num_remove=2, blocks=16, seq_len=32, released_dir=str(RELEASED_DIR))
    outcomes = {"released": replaceme.released_replaceme(settings, blocks), "layerfold": replaceme.layerfold_replaceme(settings, blocks)}
    comparisons = replaceme.compare_replaceme(outcomes, 1e-6)
    assert not failed(comparisons), failed(comparisons)
    by_name = {c["name"]: c for c in comparisons}
    assert by_name["block_distance_last"]["passed"]  # constant final-norm weight: the post-norm state gives the same angle
    assert by_name["fold_weight"]["gate"] and by_name["transform"]["gate"]  # bfloat16 checkpoint, block before the last layer


def test_linear_patch_reproduces_the_released_patch(stories_checkpoint: Path, one_thread) -> None:
    needs("linear_patch")
    blocks = torch.randint(3, 512, (128, 16), generator=torch.Generator().manual_seed(1))  # the released code reads 128 samples
    blocks[:, 0] = 1
    settings = adapters_2025.Settings(checkpoint=str(stories_checkpoint), num_remove=2, blocks=128, seq_len=16, batch_size=1,
                               released_dir=str(RELEASED_DIR))
    released = linear_patch.released_linear_patch(settings, blocks)
    settings.window = released.record["window"]
    outcomes = {"released": released, "layerfold": linear_patch.layerfold_linear_patch(settings, blocks)}
    comparisons = linear_patch.compare_linear_patch(outcomes, 1e-6)
    assert not failed(comparisons), failed(comparisons)
    assert {c["name"]: c for c in comparisons}["rotation_construction"]["passed"]  # width 64: the same Sylvester matrix


def test_2025_settings_extend_the_seed_settings() -> None:
    """The 2025 comparison builds its calibration blocks with the seed comparison's ``data_dir`` and hands LinearPatch's
    window over in the same settings file: one Settings type, extended, that survives the JSON round trip."""
    from dataclasses import asdict

    settings = adapters_2025.Settings(checkpoint="ckpt", data_dir="datasets", window=[3, 5])
    assert isinstance(settings, runner.Settings) and settings.seq_len == 128 and settings.data_dir == "datasets"
    assert adapters_2025.Settings(**json.loads(json.dumps(asdict(settings)))) == settings


def test_a_side_runs_in_its_own_worker_process(stories_checkpoint: Path, tmp_path: Path) -> None:
    """``run_in_worker`` with the 2025 registry's module: the settings file, the blocks and the outcome make the round
    trip through ``python -m parity.methods_2025 worker`` (the path every timed run takes)."""
    from dataclasses import asdict

    from parity import orchestrate

    blocks = torch.randint(3, 512, (16, 32), generator=torch.Generator().manual_seed(0))
    blocks[:, 0] = 1
    settings = adapters_2025.Settings(checkpoint=str(stories_checkpoint), num_remove=2, blocks=16, seq_len=32, threads=1,
                                      released_dir=str(RELEASED_DIR))
    (tmp_path / "settings.json").write_text(json.dumps(asdict(settings)))
    torch.save(blocks, tmp_path / "blocks.pt")
    outcome = orchestrate.run_in_worker("replaceme", "layerfold", tmp_path / "settings.json", tmp_path / "blocks.pt",
                                        tmp_path / "out", module="parity.methods_2025")
    in_process = replaceme.layerfold_replaceme(settings, blocks)
    assert outcome.record["plan"]["removed"] == in_process.record["plan"]["removed"] and outcome.measurement["seconds"] > 0
    assert outcome.state.keys() == in_process.state.keys()
    assert torch.equal(outcome.state["__transform__"], in_process.state["__transform__"])


def test_the_run_command_writes_a_passing_record_with_both_timings(stories_checkpoint: Path, tmp_path: Path) -> None:
    """``python -m parity.methods_2025 run`` end to end: calibration blocks from the data directory, both sides in their
    worker processes, the record (with a timing row per side) and the summary written."""
    needs("replaceme")
    from conftest import data_dir

    if not data_dir().is_dir():
        pytest.skip("local datasets folder not present (set LAYERFOLD_DATA_DIR)")
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "parity.methods_2025", "run", "--methods", "replaceme", "--checkpoint", str(stories_checkpoint),
                           "--num-remove", "2", "--blocks", "16", "--seq-len", "32", "--threads", "1", "--tag", "t",
                           "--released-dir", str(RELEASED_DIR), "--data-dir", str(data_dir()), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "replaceme_t.json").read_text())
    assert record["passed"] and record["comparisons"] and "error" not in record
    assert [r["side"] for r in record["rows"]] == ["released", "layerfold"] and all(r["seconds"] > 0 for r in record["rows"])
    assert record["settings"]["blocks"] == 16 and record["settings"]["num_remove"] == 2
    assert "## replaceme_t: PASS" in (out / "summary_2025.md").read_text()
