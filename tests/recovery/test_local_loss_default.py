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


def test_docs_claim_the_gap_to_the_old_default_is_many_times_the_seed_spread() -> None:
    """docs/recovery.md (Reading it): the settings that leave the sink out beat `all` by many times their spread."""
    records, _ = committed()
    for task, cells in masking.decide(records)["summary"].items():
        for m in cells["all"]:
            spread = max(c[m]["sd"] for c in cells.values())
            for setting, c in cells.items():
                if setting != "all":
                    assert cells["all"][m]["mean"] - c[m]["mean"] > 10 * spread, (task, setting, m)
