"""The headline protocol on hand-made results: which tasks count, the headline and its verdict, answer
drift, collapse and the ranking, rank agreement with perplexity, and the summary metric; and the rule on
the committed SmolLM2 dense run reproduces the set docs/protocol.md documents."""

from __future__ import annotations

import math
import random
import re

import pytest
from conftest import REPO

from layerfold.evaluation.answers import answer_floor, pack_digits, target_floor, unpack_digits
from layerfold.evaluation.results import pack_bits
from layerfold.report.collected import load_task_facts, tasks_of
from layerfold.runs.collect import load_records
from layerfold.report.noise import marginal_homogeneity, rank_agreement, retained_interval
from layerfold.report.protocol import (
    chosen_answers, collapsed, headline, headline_difference, informative_tasks, perplexity_agreement, ranking, run_drift,
    summary, task_drift,
)

COMMITTED = REPO / "results" / "comparison" / "smollm2-135m-q4_1_h100"


def _result(chosen: list[int], gold: list[int], choices: int, labels: list[str] | None = None, metric: str = "acc") -> dict:
    """A task result as the evaluate stage records it: aggregate, 0/1 per document, chosen and gold answers, floor."""
    correct = [int(c == g) for c, g in zip(chosen, gold)]
    n, p = len(correct), sum(correct) / len(correct)
    return {metric: p, f"{metric}_stderr": math.sqrt(p * (1 - p) / (n - 1)), "n": n, "per_doc": {metric: pack_bits(correct)},
            "doc_ids": None,
            "answers": {"chosen": {"acc": pack_digits(chosen), "acc_norm": pack_digits(chosen)}, "gold": pack_digits(gold),
                        "choices": pack_digits([choices] * n), "labels": labels,
                        "floor": answer_floor(gold, [choices] * n, labels)}}


def _model(ppl: float, **tasks: dict) -> dict:
    return {"model": {"num_layers": 22, "params_total": 1.0e8}, "perplexity": {"wikitext2": {"perplexity": ppl}}, "lm_eval": tasks}


def _answers_with_accuracy(gold: list[int], accuracy: float, choices: int, rng: random.Random) -> list[int]:
    """Answers right on the first ``accuracy`` share of the documents, a wrong choice elsewhere."""
    cut = round(accuracy * len(gold))
    return [g if i < cut else (g + 1 + rng.randrange(choices - 1)) % choices for i, g in enumerate(gold)]


@pytest.fixture(scope="module")
def toy():
    """Dense, a working compressed model, and a collapsed one that answers "yes" to every yes/no question.

    ``balanced``: a two-choice task with even gold labels on which dense scores 70 % (informative);
    ``yesno``: a yes/no task with 62 % "yes" on which dense, answering mostly "no", scores 40 % (below the
    majority class: not informative); ``fourway``: four choices where dense is at chance (25 %).
    """
    rng = random.Random(0)
    n = 400
    balanced = [i % 2 for i in range(n)]
    yesno = [int(i < 248) for i in range(n)]  # 62 % yes
    rng.shuffle(yesno)
    fourway = [i % 4 for i in range(n)]
    no_mostly = [0 if rng.random() < 0.9 else 1 for _ in range(n)]
    dense = _model(20.0, balanced=_result(_answers_with_accuracy(balanced, 0.70, 2, rng), balanced, 2),
                   yesno=_result(no_mostly, yesno, 2, ["no", "yes"]),
                   fourway=_result(_answers_with_accuracy(fourway, 0.25, 4, rng), fourway, 4))
    working = _model(40.0, balanced=_result(_answers_with_accuracy(balanced, 0.66, 2, rng), balanced, 2),
                     yesno=_result(no_mostly, yesno, 2, ["no", "yes"]),
                     fourway=_result(_answers_with_accuracy(fourway, 0.25, 4, rng), fourway, 4))
    collapsed_run = _model(1.0e9, balanced=_result([1] * n, balanced, 2),  # one class everywhere: 50 %
                           yesno=_result([1] * n, yesno, 2, ["no", "yes"]),  # always "yes": the majority rate, 62 %
                           fourway=_result([3] * n, fourway, 4))
    return dense, working, collapsed_run


def test_a_task_at_chance_or_below_the_majority_is_excluded_with_its_reason(toy):
    dense, _, _ = toy
    decision = informative_tasks(dense, ["balanced", "yesno", "fourway"])
    assert decision["rule"] == "auto" and decision["tasks"] == ["balanced"]
    reasons = {e["task"]: e["reason"] for e in decision["excluded"]}
    assert "not above its floor 25.00 % (chance;" in reasons["fourway"]
    assert "not above its floor 62.00 % (majority class (yes);" in reasons["yesno"] and "chance 50.00 %" in reasons["yesno"]
    d = decision["decisions"]["balanced"]
    assert d["informative"] and d["floor"] == 0.5 and d["z"] == pytest.approx((0.70 - 0.5) / d["se"])


def test_a_fixed_task_list_overrides_auto_and_says_so(toy):
    dense, _, _ = toy
    decision = informative_tasks(dense, ["balanced", "yesno", "fourway"], ["yesno", "fourway"])
    assert decision["rule"] == "fixed" and decision["tasks"] == ["yesno", "fourway"]
    assert decision["excluded"] == [{"task": "balanced", "reason": "not in the fixed list eval.headline.tasks"}]
    assert "fixed task list" in decision["text"]
    with pytest.raises(ValueError, match="does not evaluate|did not evaluate"):
        informative_tasks(dense, ["balanced"], ["piqa"])


def test_a_collapsed_majority_answering_run_cannot_rank_above_a_working_run(toy):
    dense, working, collapsed_run = toy
    tasks = ["balanced", "yesno", "fourway"]
    every = {name: headline(m, tasks)["value"] for name, m in (("working", working), ("collapsed", collapsed_run))}
    assert every["collapsed"] > every["working"]  # the all-task average the comparison used to rank by: the label prior wins
    decision = informative_tasks(dense, tasks)
    rows = [{"run": name, "headline": headline(m, decision["tasks"])["value"], "wikitext2_ppl": m["perplexity"]["wikitext2"]["perplexity"],
             "collapsed": collapsed(m["perplexity"]["wikitext2"]["perplexity"], 20.0)}
            for name, m in (("collapsed", collapsed_run), ("working", working))]
    assert [r["run"] for r in ranking(rows)] == ["working", "collapsed"]
    assert rows[0]["collapsed"] and not rows[1]["collapsed"]
    # even where a collapsed run's headline were higher, it ranks after every working run
    rows[0]["headline"] = 0.99
    assert [r["run"] for r in ranking(rows)] == ["working", "collapsed"]
    # and it is marked as drifting towards "yes"
    drift = run_drift(dense, collapsed_run, tasks)
    assert {d["task"]: d["to"] for d in drift["drifted"]}["yesno"] == "yes"
    assert drift["tasks"]["yesno"]["test"] == "McNemar" and drift["tasks"]["fourway"]["test"] == "Stuart-Maxwell"


def test_headline_difference_verdict_and_retained_interval(toy):
    dense, working, _ = toy
    d = headline_difference(working, dense, ["balanced"])
    assert d["diff"] == pytest.approx(-0.04) and d["paired"]
    assert d["verdict"] == ("behind" if abs(d["diff"]) > 1.96 * d["se"] else "within noise")
    assert d["retained_pct"] == pytest.approx(100 * 0.66 / 0.70)
    assert d["low"] == pytest.approx(100 * (1 + (-0.04 - 1.96 * d["se"]) / 0.70))
    assert retained_interval(None, d)["retained_pct"] is None


def test_stuart_maxwell_by_hand_and_mcnemar_for_two_classes():
    # two classes: 30 documents move 0 -> 1, 10 move 1 -> 0: McNemar (30 - 10)^2 / (30 + 10) = 10
    before = [0] * 30 + [1] * 10 + [0] * 50 + [1] * 50
    after = [1] * 30 + [0] * 10 + [0] * 50 + [1] * 50
    test = marginal_homogeneity(before, after)
    assert test["statistic"] == pytest.approx(10.0) and test["df"] == 1
    assert test["p"] == pytest.approx(math.erfc(math.sqrt(10.0 / 2)))  # chi2(1) survival
    # three classes, hand-computed: n01=6, n10=2, n02=4, n20=1, n12=3, n21=3 (diagonal 20 each)
    pairs = [(0, 1)] * 6 + [(1, 0)] * 2 + [(0, 2)] * 4 + [(2, 0)] * 1 + [(1, 2)] * 3 + [(2, 1)] * 3 + [(k, k) for k in range(3)] * 20
    test = marginal_homogeneity([a for a, _ in pairs], [b for _, b in pairs])
    d = [10 - 3, 5 - 9]  # row minus column totals of classes 0 and 1 (off-diagonal)
    s = [[8 + 5, -(6 + 2)], [-(6 + 2), 8 + 6]]
    det = s[0][0] * s[1][1] - s[0][1] * s[1][0]
    expected = (d[0] * (s[1][1] * d[0] - s[0][1] * d[1]) + d[1] * (-s[1][0] * d[0] + s[0][0] * d[1])) / det
    assert test["df"] == 2 and test["statistic"] == pytest.approx(expected)
    assert marginal_homogeneity([1, 2, 0], [1, 2, 0]) == {"statistic": 0.0, "df": 0, "p": 1.0, "n": 3}


def test_two_choice_answers_are_derived_from_correctness_and_gold():
    gold = [0, 1, 1, 0, 1]
    result = {"acc": 0.6, "per_doc": {"acc": pack_bits([1, 0, 1, 0, 1])}, "doc_ids": None}
    facts = {"gold": pack_digits(gold), "choices": pack_digits([2] * 5), "labels": ["no", "yes"]}
    assert chosen_answers(result, "acc", facts) == [0, 0, 1, 1, 1]
    assert chosen_answers(result, "acc", {**facts, "choices": pack_digits([4] * 5)}) is None  # not derivable with 4 choices
    drift = task_drift({"lm_eval": {"t": result}}, {"lm_eval": {"t": result}}, "t", facts)
    assert drift["derived"] and drift["p"] == 1.0


def test_floors_from_documents():
    floor = answer_floor([1, 1, 1, 0, 2], [3, 3, 3, 3, 4], None)
    assert floor["chance"] == pytest.approx((4 / 3 + 1 / 4) / 5) and floor["majority"] == 0.6 and floor["majority_class"] == "B"
    assert answer_floor([1, 1, 0], [2, 2, 2], ["no", "yes"])["majority_class"] == "yes"
    lambada = target_floor([" him", " her", " him", " it"])
    assert lambada["chance"] == 0.0 and lambada["majority"] == 0.5 and lambada["majority_class"] == "him"
    assert unpack_digits(pack_digits([0, 9, 10, 35])) == [0, 9, 10, 35]
    with pytest.raises(ValueError):
        pack_digits([36])


def test_rank_agreement_and_inversions():
    assert rank_agreement([0.5, 0.4, 0.3], [10.0, 20.0, 30.0])["rho"] == pytest.approx(1.0)
    assert rank_agreement([0.3, 0.4, 0.5], [10.0, 20.0, 30.0])["rho"] == pytest.approx(-1.0)
    rows = [{"run": "a", "headline": 0.50, "wikitext2_ppl": 100.0}, {"run": "b", "headline": 0.45, "wikitext2_ppl": 30.0},
            {"run": "c", "headline": 0.40, "wikitext2_ppl": 40.0}]
    result = perplexity_agreement(rows, {}, [])
    assert [(p["a"], p["b"]) for p in result["inversions"]] == [("a", "b")]  # a above b at 3.3x b's perplexity; c not 3x
    assert result["n"] == 3


def test_summary_is_flat_and_in_points(toy):
    dense, working, _ = toy
    decision = informative_tasks(dense, ["balanced", "yesno", "fourway"])
    out = summary(dense, working, decision, {"train_tokens_processed": 1234}, run_drift(dense, working, ["balanced", "yesno", "fourway"]))
    assert out["headline"] == 66.0 and out["dense"] == 70.0 and out["delta"] == -4.0
    assert out["tasks"] == ["balanced"] and out["n_tasks"] == 1 and out["rule"] == "auto" and out["train_tokens"] == 1234
    assert out["layers"] == 22 and out["params_m"] == 100.0 and out["collapsed"] is False
    assert all(not isinstance(v, dict) for v in out.values())


def test_the_rule_reproduces_its_documented_set_on_the_committed_dense_run():
    """docs/protocol.md names the informative set of the committed SmolLM2 comparison; the rule, run on that
    comparison's dense results and the task facts computed from its documents, must give exactly that set."""
    documented = re.search(r"Informative set of the committed SmolLM2 comparison: `([^`]+)`", (REPO / "docs" / "protocol.md").read_text())
    assert documented, "docs/protocol.md must state the committed comparison's informative set"
    records = load_records(COMMITTED)
    facts = load_task_facts(COMMITTED)
    assert facts is not None
    decision = informative_tasks(records[0]["metrics"]["dense"], tasks_of(records), "auto", facts)
    assert ", ".join(decision["tasks"]) == documented[1]
    # BoolQ's majority class is "yes" at 2,033 of 3,270 documents
    assert facts["boolq_notitle"]["floor"]["majority"] == pytest.approx(2033 / 3270)
    assert facts["boolq_notitle"]["floor"]["majority_class"] == "yes"


def test_validate_checks_the_headline_setting():
    from layerfold.config import ConfigError, compose, parse_params
    from layerfold.validation import check

    assert parse_params(compose(REPO / "conf", []), "default").eval.headline.tasks == "auto"
    check(parse_params(compose(REPO / "conf", ["eval.headline.tasks=[piqa,hellaswag]"]), "fixed"), None)
    with pytest.raises(ConfigError, match=r"eval.headline.tasks lists \['mmlu'\], which eval.lm_eval.tasks=.* does not evaluate"):
        check(parse_params(compose(REPO / "conf", ["eval.headline.tasks=[piqa,mmlu]"]), "bad"), None)
    with pytest.raises(ConfigError, match="use auto .* or a non-empty list"):
        check(parse_params(compose(REPO / "conf", ["eval.headline.tasks=some"]), "bad"), None)
