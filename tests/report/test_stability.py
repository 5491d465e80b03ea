"""Calibration stability: chosen layers from hand-made plans, agreement, spreads, the table, and the runner
end to end on stories260K (two draws, two methods, resumed)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, data_dir, models_dir
from layerfold.config import ConfigError
from layerfold.report.stability import (
    DOC_BEGIN,
    DOC_END,
    chance_jaccard,
    coefficient_ranges,
    chosen_layers,
    draw_key,
    format_spread,
    jaccard,
    layer_counts,
    majority_layers,
    mean_chance_jaccard,
    mean_pairwise_jaccard,
    merged_layers,
    method_result,
    notes,
    pairwise_jaccard,
    parse_entry,
    plan_groups,
    replace_generated,
    report_markdown,
    run_context,
    spread,
    stability_table,
    summarise,
)


def plan(groups: list[list[int]], original: int = 10) -> dict:
    return {"original_layers": original, "layers": [{"index": i, "stands_for": g} for i, g in enumerate(groups)]}


def keep_except(chosen: set[int], original: int = 10) -> list[list[int]]:
    return [[i] for i in range(original) if i not in chosen]


# --- chosen layers ------------------------------------------------------------------------------------


def test_removal_plan_chooses_the_removed_layers():
    assert chosen_layers(plan(keep_except({2, 5, 6}))) == [2, 5, 6]


def test_merged_layers_count_as_chosen_base_included():
    # layer 3 absorbed 4 and 5 (a LaCo/MKA merge), layer 8 was removed: 3 no longer exists on its own either
    groups = [[0], [1], [2], [3, 4, 5], [6], [7], [9]]
    assert chosen_layers(plan(groups)) == [3, 4, 5, 8]


def test_two_disjoint_pair_merges_choose_four_layers():
    groups = [[0, 1], [2], [3], [4], [5], [6], [7, 8], [9]]
    assert chosen_layers(plan(groups)) == [0, 1, 7, 8]


def test_dense_plan_chooses_nothing():
    assert chosen_layers(plan([[i] for i in range(10)])) == []


def test_merged_layers_keep_their_coefficients():
    merged = plan([[0], [1, 2], [3]], original=4)
    merged["layers"][1]["coefficients"] = [0.6123456789, 0.3876543211]
    assert merged_layers(merged) == [{"stands_for": [1, 2], "coefficients": [0.612346, 0.387654]}]
    assert merged_layers(plan([[0, 1], [2]], original=3)) == [{"stands_for": [0, 1], "coefficients": None}]
    assert merged_layers(plan(keep_except({1}))) == []


@pytest.mark.parametrize("bad", [
    {"layers": [{"stands_for": [0]}]},  # no original_layers
    plan([[0], [0, 1]]),  # an original layer behind two new ones
    plan([[0], [12]]),  # outside the original stack
    plan([[0], []]),  # a new layer standing for nothing
])
def test_malformed_plans_are_refused(bad):
    with pytest.raises(ValueError, match="plan"):
        plan_groups(bad)


def test_groups_are_sorted():
    assert plan_groups(plan([[5, 3], [0]])) == [[3, 5], [0]]


# --- agreement ----------------------------------------------------------------------------------------


def test_jaccard():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 / 4)
    assert jaccard({1}, {2}) == 0.0
    assert jaccard(set(), set()) == 1.0
    assert jaccard([1, 1, 2], [2, 1]) == 1.0


def test_mean_pairwise_jaccard_averages_every_pair():
    sets = [{1, 2}, {1, 2}, {3, 4}]
    assert pairwise_jaccard(sets) == [1.0, 0.0, 0.0]
    assert mean_pairwise_jaccard(sets) == pytest.approx(1 / 3)
    assert mean_pairwise_jaccard([{1}]) is None


def _brute_force_chance(n: int, a: int, b: int) -> float:
    first = list(itertools.combinations(range(n), a))
    second = list(itertools.combinations(range(n), b))
    return sum(jaccard(x, y) for x in first for y in second) / (len(first) * len(second))


@pytest.mark.parametrize("n,a,b", [(6, 2, 2), (6, 2, 4), (7, 3, 3), (5, 5, 2), (6, 0, 3)])
def test_chance_jaccard_matches_enumeration(n, a, b):
    assert chance_jaccard(n, a, b) == pytest.approx(_brute_force_chance(n, a, b), abs=1e-12)


def test_chance_jaccard_edges():
    assert chance_jaccard(10, 0, 0) == 1.0
    assert chance_jaccard(10, 10, 10) == 1.0
    with pytest.raises(ValueError, match="0..10"):
        chance_jaccard(10, 11, 2)
    # more chosen layers agree more by chance: 16 of 30 vs 8 of 30
    assert chance_jaccard(30, 16, 16) > chance_jaccard(30, 8, 8)
    assert mean_chance_jaccard(30, [set(range(8)), set(range(8)), set(range(16))]) == pytest.approx(
        (chance_jaccard(30, 8, 8) + 2 * chance_jaccard(30, 8, 16)) / 3)


def test_majority_layers_at_least_half_the_draws():
    sets = [{1, 2, 3}, {1, 2}, {1, 4}, {5}, {1, 2}]  # K = 5: a layer needs 3 draws
    assert layer_counts(sets) == {1: 4, 2: 3, 3: 1, 4: 1, 5: 1}
    assert majority_layers(sets) == [1, 2]
    assert majority_layers(sets[:4]) == [1, 2]  # K = 4: 2 draws are half
    assert majority_layers([{7}, {8}]) == [7, 8]  # K = 2: one draw is half
    assert majority_layers([]) == []


# --- spreads and summary ------------------------------------------------------------------------------


def test_spread_sample_sd_and_missing_values():
    s = spread([1.0, 2.0, None, 3.0])
    assert s == {"n": 3, "mean": 2.0, "sd": 1.0, "min": 1.0, "max": 3.0}
    assert spread([4.0])["sd"] is None
    assert spread([None]) is None
    assert format_spread(s) == "2.000 ± 1.000 [1.000, 3.000]"
    assert format_spread(spread([4.0])) == "4.000 (1 draw)"


def record(seed: int, chosen: set[int], loss: float, dense: float, held: float, ppl: float, original: int = 10) -> dict:
    return {"seed": seed, "original_layers": original, "groups": keep_except(chosen, original), "loss": loss, "dense_loss": dense,
            "held_out_loss": held, "perplexity": {"wikitext2": ppl}, "compress_seconds": 1.0}


def test_summary_of_hand_made_draws():
    draws = [record(0, {2, 3}, 3.0, 2.0, 4.0, 20.0), record(1, {2, 3}, 3.5, 2.25, 4.5, 30.0), record(2, {2, 7}, 4.0, 2.5, 5.0, 40.0)]
    s = summarise(draws, 10)
    assert s["draws"] == 3 and s["seeds"] == [0, 1, 2] and s["layers_after"] == [8]
    assert s["pairwise_jaccard"] == pytest.approx([1.0, 1 / 3, 1 / 3])
    assert s["mean_jaccard"] == pytest.approx(5 / 9)
    assert s["chance_jaccard"] == pytest.approx(chance_jaccard(10, 2, 2))
    assert s["distinct_sets"] == 2 and s["distinct_plans"] == 2
    assert s["majority_layers"] == [2, 3]
    assert s["layer_counts"] == {"2": 3, "3": 2, "7": 1}
    assert s["loss"]["mean"] == pytest.approx(3.5) and s["loss"]["sd"] == pytest.approx(0.5)
    assert s["loss_minus_dense"]["mean"] == pytest.approx(1.25) and s["loss_minus_dense"]["min"] == pytest.approx(1.0)
    assert s["held_out_loss"]["max"] == pytest.approx(5.0)
    assert s["perplexity"]["wikitext2"]["mean"] == pytest.approx(30.0)


def test_table_and_notes_read_off_the_numbers():
    stable = method_result("stable", ["method=a"], [record(s, {4, 5}, 3.0 + s / 10, 2.0, 4.0, 20.0) for s in range(3)], planned=3)
    wobbly = method_result("wobbly", ["method=b"], [record(0, {1}, 3.0, 2.0, 4.0, 2e5), record(1, {8}, 3.2, 2.0, 4.2, 3e5)], planned=3)
    table = stability_table([{"name": r["name"], "summary": r["summary"]} for r in (stable, wobbly)], held_out="c4")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    assert rows["stable"][1:6] == ["3", "8", f"1.00 ({chance_jaccard(10, 2, 2):.2f})", "1 of 3", "4–5"]
    assert rows["wobbly"][1:6] == ["2", "9", f"0.00 ({chance_jaccard(10, 1, 1):.2f})", "2 of 2", "1, 8"]
    assert rows["stable"][6] == "3.100 ± 0.100 [3.000, 3.200]"
    assert rows["wobbly"][9].startswith("2.5e+05 ± 7.07e+04")  # large perplexities in 3 significant digits
    lines = notes([stable, wobbly])
    assert lines == ["Fewer draws than planned: wobbly (2 of 3).",
                     "The same plan (every new layer standing for the same original layers) in every draw: stable."]


def test_report_states_the_dequantisation_only_when_it_applies():
    result = method_result("m", ["method=a"], [record(s, {1}, 3.0, 2.0, 4.0, 20.0) for s in range(2)], planned=2)
    context = {"model": "tiny", "calibration": {"num_blocks": 8, "seq_len": 64, "source": "wikitext2_train", "chunking": "concat", "add_bos": True},
               "held_out": {"num_blocks": 8, "seq_len": 64, "source": "c4", "chunking": "per_document", "seed": 0},
               "perplexity": {"seq_len": 128, "max_windows": 2, "add_bos": False}, "dense_perplexity": {"wikitext2": 10.0},
               "dense_loss": spread([2.0, 2.0]), "dense_held_out_loss": 4.0, "device": "cpu", "dtype": "float32", "date": "2026-12-05",
               "seeds": [0, 1]}
    plain = report_markdown([result], {**context, "quantization": "none (float32)"})
    quantised = report_markdown([result], {**context, "quantization": "Q4_1 (GGUF), dequantised to bfloat16"})
    assert "not the full-precision model" not in plain and "not the full-precision model" in quantised
    assert "| m | 2 | 9 |" in plain


def test_run_context_lists_every_device_and_the_dense_spread():
    records = [{**record(s, {1}, 3.0, 2.0 + s, 4.0, 20.0), "device": dev, "dense_perplexity": {"wikitext2": 9.0}, "dense_held_out_loss": 4.0,
                "measure": {"dtype": "float32"}} for s, dev in ((1, "cpu (2 threads)"), (0, "cpu (16 threads)"))]
    params = {"model": {"name": "m"}, "data": {"calibration": {"seed": 0}}, "eval": {"perplexity": {"seq_len": 64}}}
    context = run_context(params, {"data": {"calibration": {"source": "c4"}}}, {"quantization": "q"}, records, [0, 1], [], [], date="2026-12-05")
    assert context["device"] == "cpu (16 threads); cpu (2 threads)"
    assert context["dense_loss"]["mean"] == pytest.approx(2.5) and context["held_out"] == {"source": "c4"}


def test_replace_generated_keeps_the_prose_around_the_table():
    doc = "intro\n<!-- a -->\nold table\n<!-- b -->\noutro\n"
    assert replace_generated(doc, "| new |\n", "<!-- a -->", "<!-- b -->") == "intro\n<!-- a -->\n| new |\n<!-- b -->\noutro\n"
    for bad in ("no markers", "<!-- b -->\n<!-- a -->", "<!-- a -->\n<!-- a -->\n<!-- b -->"):
        with pytest.raises(ValueError, match="add them"):
            replace_generated(bad, "x", "<!-- a -->", "<!-- b -->")


def test_method_result_refuses_draws_of_different_models():
    with pytest.raises(ValueError, match="different depths"):
        method_result("m", [], [record(0, {1}, 3.0, 2.0, 4.0, 20.0), record(1, {1}, 3.0, 2.0, 4.0, 20.0, original=12)], planned=2)


def test_parse_entry_and_draw_key():
    assert parse_entry("sleb-r4:method=sleb, method.num_remove=4").overrides == ("method=sleb", "method.num_remove=4")
    for bad in ("sleb", "sleb:", ":method=sleb"):
        with pytest.raises(ConfigError, match="NAME:OVERRIDE"):
            parse_entry(bad)
    params = {"model": {"name": "m"}, "data": {"calibration": {"seed": 0}, "benchmarks": ["piqa"]}, "capture": {}, "hardware": {},
              "runtime": {}, "method": {"name": "a"}, "eval": {"x": 1}}
    same = {**params, "data": {**params["data"], "benchmarks": []}, "method": {"name": "b"}, "eval": {"x": 2}}
    other = {**params, "data": {"calibration": {"seed": 1}, "benchmarks": ["piqa"]}}
    assert draw_key(params) == draw_key(same)  # methods, evaluation and benchmarks share a draw
    assert draw_key(params) != draw_key(other)  # another seed is another draw


# --- the runner end to end -----------------------------------------------------------------------------

TINY = ["model=stories260k", "data.calibration.num_blocks=8", "data.calibration.seq_len=64", "data.calibration.chunking=per_document",
        "capture.batch_size=8",
        "eval.perplexity.datasets=[wikitext2]", "eval.perplexity.seq_len=64", "eval.perplexity.max_windows=1",
        "eval.lm_eval.tasks=[]"]


def _script():
    spec = importlib.util.spec_from_file_location("calibration_stability_script", REPO / "scripts" / "calibration_stability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script, monkeypatch, out: Path, *extra: str) -> int:
    argv = ["calibration_stability.py", "--out", str(out), "--draws", "2", *[a for o in TINY for a in ("-o", o)],
            "--entry", "shortgpt:method=shortgpt,method.num_remove=2", "--entry", "sleb:method=sleb,method.num_remove=2", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    return script.main()


@pytest.fixture
def tiny_env(monkeypatch, one_thread):
    if not (data_dir().is_dir() and (models_dir() / "stories260K").is_dir()):
        pytest.skip("local datasets/models folders not present")
    monkeypatch.setenv("LAYERFOLD_DATA_DIR", str(data_dir()))
    monkeypatch.setenv("LAYERFOLD_MODELS_DIR", str(models_dir()))


def test_runner_end_to_end_on_stories260k(tmp_path, monkeypatch, tiny_env):
    script = _script()
    out = tmp_path / "stability"
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Stability\n\nprose\n{DOC_BEGIN}\n{DOC_END}\nmore prose\n")
    assert _run(script, monkeypatch, out, "--doc", str(doc)) == 0

    table = (out / "table.md").read_text()
    assert "| shortgpt | 2 | 3 |" in table and "| sleb | 2 | 3 |" in table
    written = doc.read_text()
    assert written.startswith("# Stability\n\nprose\n") and written.endswith(f"{DOC_END}\nmore prose\n")
    assert table.split("\n", 2)[2].strip() in written  # the same table, without its title
    assert (out / ".gitignore").read_text() == "/work/\n"
    work = out / "work"
    held_out = None
    for name in ("shortgpt", "sleb"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["summary"]["draws"] == 2 and result["original_layers"] == 5
        for draw in result["per_draw"]:
            folder = work / "runs" / name / f"seed-{draw['seed']}"
            plan_json = json.loads((folder / "plan.json").read_text())
            assert draw["chosen"] == chosen_layers(plan_json) and len(draw["chosen"]) == 2
            assert not (folder / "artifacts" / "compressed").exists()  # the checkpoint is deleted, the plan kept
            assert draw["loss"] > draw["dense_loss"] > 0
            held_out = draw["dense_held_out_loss"] if held_out is None else held_out
            assert draw["dense_held_out_loss"] == held_out  # one held-out set for every draw and method

    # the two draws are different windows of the same source, the held-out set is C4
    draws = {}
    for meta in work.glob("draws/*/data/prepared/calibration/meta.json"):
        facts = json.loads(meta.read_text())
        draws[(facts["source"], facts["seed"])] = load_file(meta.parent / "blocks.safetensors")["input_ids"]
    assert set(draws) == {("wikitext2_train", 0), ("wikitext2_train", 1), ("c4", 0)}
    assert draws[("wikitext2_train", 0)].shape == draws[("wikitext2_train", 1)].shape == (8, 64)
    assert not torch.equal(draws[("wikitext2_train", 0)], draws[("wikitext2_train", 1)])

    # the dense loss on a draw is the base model's mean NLL on that draw's blocks
    from layerfold.execution.loss import calibration_nll
    from layerfold.models import load_checkpoint

    base = next(work.glob("base/*/artifacts/base"))
    model, _ = load_checkpoint(base, "cpu", torch.float32)
    shortgpt = json.loads((out / "shortgpt.json").read_text())["per_draw"]
    for draw in shortgpt:
        assert draw["dense_loss"] == pytest.approx(calibration_nll(model, draws[("wikitext2_train", draw["seed"])], 8), rel=1e-5)

    # resumed: every (method, draw) is done, so no stage runs again and the table is the same
    from pipeline import capture, compress, data

    def refuse():
        raise AssertionError("a finished draw ran a stage again")

    for stage in (data, capture, compress):
        monkeypatch.setattr(stage, "main", refuse)
    assert _run(script, monkeypatch, out) == 0
    assert (out / "table.md").read_text() == table

    # other settings over finished draws: refused, naming the folder to delete
    monkeypatch.undo()
    monkeypatch.setenv("LAYERFOLD_DATA_DIR", str(data_dir()))
    monkeypatch.setenv("LAYERFOLD_MODELS_DIR", str(models_dir()))
    with pytest.raises(ConfigError, match="Delete"):
        _run(script, monkeypatch, out, "-o", "eval.perplexity.max_windows=2")


def test_runner_refuses_bad_entries_before_running(tmp_path, monkeypatch, tiny_env, capsys):
    script = _script()
    assert _run(script, monkeypatch, tmp_path / "x", "--draws-for", "nope=1") == 2
    assert "--draws-for" in capsys.readouterr().err
    assert _run(script, monkeypatch, tmp_path / "y", "--entry", "big:method=shortgpt,method.num_remove=9") == 2  # 9 of 5 layers
    assert "num_remove" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# --- the committed results and their page --------------------------------------------------------------

COMMITTED = REPO / "results" / "calibration_stability" / "smollm2-135m-q4_1_cpu"
DOC = REPO / "docs" / "calibration_stability.md"


def test_doc_table_is_the_committed_results():
    """docs/calibration_stability.md shows exactly what the committed JSON files say: the block between the markers is
    regenerated from them (every number, every setting line, the notes and the wall times), in the page's method order."""
    results = {path.stem: json.loads(path.read_text()) for path in sorted(COMMITTED.glob("*.json"))}
    assert results, f"no results in {COMMITTED}"
    contexts = [r.pop("context") for r in results.values()]
    assert all(c == contexts[0] for c in contexts), "the methods' results were written by different runs"
    for name, result in results.items():
        assert result["name"] == name
        assert summarise(result["per_draw"], result["original_layers"]) == result["summary"]  # the summary is the per-draw records'
    text = DOC.read_text()
    block = text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0]
    order = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in results and cells[0] not in order:
            order.append(cells[0])
    assert sorted(order) == sorted(results), f"the page's table has {order}, the results folder {sorted(results)}"
    expected = report_markdown([results[name] for name in order], contexts[0], title=False)
    assert block.strip() == expected.strip()
    assert (COMMITTED / "table.md").read_text() == report_markdown([results[name] for name in order], contexts[0])


def test_plan_only_draws_count_for_agreement_and_not_for_losses():
    measured = [record(s, {4, 5}, 3.0 + s / 10, 2.0, 4.0, 20.0 + s) for s in range(2)]
    plan_only = {**record(2, {4, 6}, 0.0, 0.0, 0.0, 0.0), "loss": None, "dense_loss": None, "held_out_loss": None, "perplexity": None}
    result = method_result("m", ["method=a"], [*measured, plan_only], planned=3)
    s = result["summary"]
    assert s["draws"] == 3 and s["distinct_sets"] == 2 and s["mean_jaccard"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert s["loss"]["n"] == s["loss_minus_dense"]["n"] == s["held_out_loss"]["n"] == s["perplexity"]["wikitext2"]["n"] == 2
    row = stability_table([{"name": "m", "summary": s}]).splitlines()[2].split(" | ")
    assert row[6] == "3.050 ± 0.071 [3.000, 3.100] (2 of 3 draws)"
    assert format_spread(spread([3.0]), of=3) == "3.000 (1 of 3 draws)" and format_spread(spread([3.0]), of=1) == "3.000 (1 draw)"
    assert notes([result])[0].startswith("Plan only, losses and perplexity not measured (`--plans-only`): m (draws 2)")


def test_runner_plans_only_then_measured(tmp_path, monkeypatch, tiny_env):
    """--plans-only writes each draw's plan and chosen layers and measures nothing; a later run measures those draws."""
    script = _script()
    out = tmp_path / "stability"
    argv = ["calibration_stability.py", "--out", str(out), "--draws", "2", *[a for o in TINY for a in ("-o", o)],
            "--entry", "shortgpt:method=shortgpt,method.num_remove=2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--plans-only"])
    assert script.main() == 0
    plans = json.loads((out / "shortgpt.json").read_text())
    assert [d["seed"] for d in plans["per_draw"]] == [0, 1]
    assert all(len(d["chosen"]) == 2 and d["loss"] is None and d["perplexity"] is None for d in plans["per_draw"])
    assert plans["summary"]["mean_jaccard"] is not None and plans["summary"]["loss"] is None
    assert "Plan only" in (out / "table.md").read_text()

    monkeypatch.setattr(sys, "argv", [*argv, "--report-only"])  # reporting measures nothing either
    assert script.main() == 0
    assert json.loads((out / "shortgpt.json").read_text())["per_draw"] == plans["per_draw"]

    monkeypatch.setattr(sys, "argv", argv)
    assert script.main() == 0
    measured = json.loads((out / "shortgpt.json").read_text())
    assert [d["chosen"] for d in measured["per_draw"]] == [d["chosen"] for d in plans["per_draw"]]  # the same plans, now measured
    assert all(d["loss"] > d["dense_loss"] > 0 and d["perplexity"]["wikitext2"] > 0 for d in measured["per_draw"])
    assert measured["summary"]["loss"]["n"] == 2 and "Plan only" not in (out / "table.md").read_text()


def test_merge_coefficients_across_draws_are_reported():
    draws = [{"seed": s, "merges": [{"stands_for": [3, 4], "coefficients": [c, 1 - c]}]} for s, c in ((0, 0.6), (1, 0.7), (2, 0.65))]
    assert coefficient_ranges(draws) == "[3–4]: 0.6–0.7, 0.3–0.4 (3 draws)"
    assert coefficient_ranges(draws[:1]) == "" and coefficient_ranges([{"seed": 0, "merges": []}]) == ""
    result = {"name": "m", "summary": {"draws": 3, "draws_planned": 3, "distinct_plans": 1, "layers_after": [9]}, "draws_planned": 3,
              "per_draw": [{**d, "loss": 1.0} for d in draws]}
    assert notes([result])[-1] == "Merge coefficients of the same group across draws (each coefficient's min–max): m [3–4]: 0.6–0.7, 0.3–0.4 (3 draws)."
