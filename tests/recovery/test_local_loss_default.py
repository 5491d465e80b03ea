"""The layer-local loss default is the one the committed measurements choose (results/recovery_loss_masking/), and
docs/recovery.md's table of them is the one generated from the committed results."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO
from layerfold.config import compose
from layerfold.io import read_json

def experiment():
    spec = importlib.util.spec_from_file_location("local_loss_masking", REPO / "benchmarks" / "local_loss_masking.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


masking = experiment()


def committed() -> tuple[list[dict], list]:
    sources = masking.DECISION_SOURCES
    return [read_json(p) for p in sources], sources


def test_configured_default_is_the_measured_choice() -> None:
    records, _ = committed()
    decision = masking.decide(records)
    assert decision["runs"], "the decision reads no run"
    for mode in ("distill", "come"):
        local = compose(REPO / "conf", [f"recovery={mode}"])["recovery"]["local"]
        assert {k: local[k] for k in decision["local"]} == decision["local"], mode


def test_docs_table_is_generated_from_the_committed_results() -> None:
    records, sources = committed()
    docs = (REPO / "docs" / "recovery.md").read_text(encoding="utf-8")
    assert masking.decision_markdown(records, sources) in docs, "run `benchmarks/local_loss_masking.py decide` on the results"


def record(task: str, values: dict[str, list[float]], ppl_shift: float = 0.0) -> dict:
    """A results record of one task: val LM loss per setting and seed (perplexity follows it)."""
    runs = [{"task": task, "setting": s, "seed": seed, "val_lm_loss": v, "wikitext2_ppl": 100 * v + ppl_shift}
            for s, vs in values.items() for seed, v in enumerate(vs)]
    return {"untrained": {task: {"val_lm_loss": 6.0, "wikitext2_ppl": 600.0}}, "runs": runs}


def test_a_setting_better_on_every_seed_is_chosen() -> None:
    d = masking.decide([record("t", {"all": [7.0, 7.1, 7.2], "ignore_first": [6.5, 6.6, 6.7], "nmse": [6.2, 6.31, 6.4]})])
    assert d["chosen"] == "nmse" and d["local"]["loss"] == "nmse"
    assert d["cells"]["t"]["val_lm_loss"] == {"best": "nmse", "within_noise": []}


def test_a_difference_inside_the_noise_is_a_tie_decided_by_the_stated_order() -> None:
    # norm_ratio's mean is lowest, but its per-seed differences to ignore_first change sign: a tie in both metrics,
    # and the tie-break (mean rank of val LM loss) then picks the lower mean.
    d = masking.decide([record("t", {"all": [7.0, 7.1, 7.2], "ignore_first": [6.3, 6.5, 6.4], "norm_ratio": [6.45, 6.2, 6.5]})])
    assert d["cells"]["t"]["val_lm_loss"] == {"best": "norm_ratio", "within_noise": ["ignore_first"]}
    assert d["cells_won"] == {"all": 0, "ignore_first": 2, "norm_ratio": 2}
    assert d["chosen"] == "norm_ratio"


def test_tasks_and_settings_without_a_noise_estimate_are_left_out_and_named() -> None:
    one_seed = record("single", {"all": [7.0], "nmse": [6.0]})
    partial = record("t", {"all": [7.0, 7.1, 7.2], "ignore_first": [6.5, 6.6], "nmse": [6.0]})
    d = masking.decide([partial, one_seed])
    assert set(d["summary"]) == {"t"} and set(d["summary"]["t"]) == {"all", "ignore_first"} and d["chosen"] == "ignore_first"
    assert d["left_out"] == {"t": "all seeds [2], nmse seeds [0]", "single": "all seeds [0], nmse seeds [0]"}
    assert d["summary"]["t"]["all"]["val_lm_loss"]["by_seed"] == {0: 7.0, 1: 7.1}
    with pytest.raises(ValueError, match="no task has the old default"):
        masking.decide([one_seed])


def test_an_incomplete_grid_names_its_missing_runs() -> None:
    full = record("t", {"all": [7.0, 7.1, 7.2], "nmse": [6.0, 6.1, 6.2]})
    short = record("u", {"all": [7.0, 7.1], "nmse": [6.0]})
    assert masking.missing_runs([full]) == {}
    assert masking.missing_runs([full, short]) == {"u": "all seeds [2], nmse seeds [1, 2]"}
    assert masking.missing_runs([full, record("v", {})]) == {"v": "all seeds [0, 1, 2], nmse seeds [0, 1, 2]"}
    described = {k: committed()[0][-1][k] for k in ("settings", "environment")}  # a committed record's setup
    block = masking.decision_markdown([full | described, short | described], [masking.OUT])
    assert "Incomplete, runs not recorded: u (all seeds [2], nmse seeds [1, 2])." in block


# docs/recovery.md (Reading it): per task and metric, how the settings that leave the sink out compare with `all`.
# "many": lower mean by more than 10x the largest seed spread; "every_seed": lower on every seed (paired);
# "all_lower": `all` lower on every seed.
SINK_OUT_AGAINST_ALL = {
    ("streamline_layer", "val_lm_loss"): "many", ("streamline_layer", "wikitext2_ppl"): "many",
    ("come", "val_lm_loss"): "every_seed", ("come", "wikitext2_ppl"): "every_seed",
    ("streamline_ffn", "val_lm_loss"): "all_lower", ("streamline_ffn", "wikitext2_ppl"): "many",
}


def test_docs_claims_against_the_old_default_hold() -> None:
    records, _ = committed()
    summary = masking.decide(records)["summary"]
    assert {(t, m) for t, cells in summary.items() for m in cells["all"]} == set(SINK_OUT_AGAINST_ALL), \
        "a task or metric entered or left the decision: state in docs/recovery.md (Reading it) how it compares"
    for task, cells in summary.items():
        for m in cells["all"]:
            claim, base = SINK_OUT_AGAINST_ALL[(task, m)], cells["all"][m]
            spread = max(c[m]["sd"] for c in cells.values())
            for setting, c in cells.items():
                if setting == "all":
                    continue
                lower = [c[m]["by_seed"][k] < base["by_seed"][k] for k in base["by_seed"]]
                if claim == "many":
                    assert base["mean"] - c[m]["mean"] > 10 * spread, (task, setting, m)
                elif claim == "every_seed":
                    assert all(lower), (task, setting, m)
                else:
                    assert not any(lower), (task, setting, m)
    # ... and on streamline_ffn, `all` leaves the perplexity above the untrained model's on every seed.
    untrained = next(r["untrained"]["streamline_ffn"] for r in records if "streamline_ffn" in r["untrained"])
    assert all(v > untrained["wikitext2_ppl"] for v in summary["streamline_ffn"]["all"]["wikitext2_ppl"]["by_seed"].values())
