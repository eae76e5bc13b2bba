"""The naive baseline: a constant guess from the training split, and a verdict that never calls a tie "better"."""

from __future__ import annotations

import math
import random

import pytest

from lab_utils.evaluation import (
    TIE_STANDARD_ERRORS,
    baseline_scores,
    beats_baseline,
    constant_answer,
    metrics_table,
    parse_number,
    row_scores,
    task_metrics,
    tie_margin,
    verdict,
)

# ---------------------------------------------------------------------------------------------- the constant guess


def test_constant_answer_is_the_training_median_for_numbers_and_the_most_frequent_answer_for_labels():
    assert constant_answer(["Price is $10", "Price is $30", "Price is $20", "no price"], "price") == "Price is $20"
    # an even count takes the lower middle value: a real training answer, and still a minimiser of the MAE
    assert constant_answer(["$1", "$2", "$3", "$9"], "price") == "$2"
    assert constant_answer(["Answer: 7", "Answer: 3", "Answer: 5"], "number", r"Answer: (\d+)") == "Answer: 5"
    assert constant_answer(["Yes.", "no", "YES", "maybe"], "exact_match") in ("Yes.", "YES")
    assert constant_answer(["Label: b!", "Label: a", "Label: b"], "regex", r"Label: (\w)") in ("Label: b!", "Label: b")
    assert constant_answer([], "price") is None
    assert constant_answer(["no price at all"], "price") is None


def test_baseline_scores_are_the_constant_answer_scored_like_a_model():
    train = ["Price is $10", "Price is $20", "Price is $40"]
    refs = ["Price is $20", "Price is $50", "Price is $10"]
    b = baseline_scores(train, refs, "price")
    assert b["answer"] == "Price is $20" and b["train_rows"] == 3
    assert b["price_mae"] == pytest.approx((0 + 30 + 10) / 3)
    assert b["price_parsed"] == 1.0
    assert baseline_scores([], refs, "price") is None


def test_tie_margin_is_two_paired_standard_errors_with_a_one_percent_floor():
    same = [5.0, 7.0, 9.0]
    assert tie_margin(same, same, 7.0) == pytest.approx(0.07)  # identical rows: the floor alone
    model, base = [0.0, 10.0, 0.0, 10.0], [10.0, 10.0, 10.0, 10.0]
    diffs = [-10.0, 0.0, -10.0, 0.0]
    sd = math.sqrt(sum((d + 5) ** 2 for d in diffs) / 3)
    assert tie_margin(model, base, 10.0) == pytest.approx(TIE_STANDARD_ERRORS * sd / 2)
    assert tie_margin([1.0], [2.0], 2.0) == math.inf  # one row cannot tell anything
    assert tie_margin([math.nan, 1.0, 2.0], [5.0, 1.0, 2.0], 3.0) == pytest.approx(0.03)  # unscored rows skipped


def test_beats_baseline_needs_more_than_the_margin_in_the_metrics_direction():
    assert beats_baseline("price_mae", 40.0, 100.0, 5.0)
    assert not beats_baseline("price_mae", 96.0, 100.0, 5.0)  # within noise
    assert not beats_baseline("price_mae", 100.0, 100.0, 0.0)  # an exact tie, even with no noise at all
    assert not beats_baseline("price_mae", 140.0, 100.0, 5.0)  # worse
    assert beats_baseline("exact_match", 0.9, 0.3, 0.1)
    assert not beats_baseline("exact_match", 0.3, 0.3, 0.0)
    assert not beats_baseline("exact_match", 0.35, 0.3, 0.1)
    assert not beats_baseline("exact_match", math.nan, 0.3, 0.1)


# ---------------------------------------------------------------------------------------------- the verdict, property-style

KINDS = {  # kind: (pattern, draw a reference, write a value as an answer (numbers only))
    "price": (None, lambda rng: f"Price is ${rng.choice([20, 45, 60, 150, 35, 70, 25, 55]) * rng.choice([1, 2, 3])}",
              lambda v: f"Price is ${v:g}"),
    "number": (r"Answer:\s*(\S+)", lambda rng: f"Answer: {rng.randint(0, 40)}", lambda v: f"Answer: {v:g}"),
    "exact_match": (None, lambda rng: rng.choice(["yes", "no", "maybe", "yes", "yes"]), None),
    "regex": (r"Label: (\w+)", lambda rng: f"Label: {rng.choice(['cat', 'dog', 'dog', 'bird'])}.", None),
}


def _metrics(kind: str, pattern, train: list[str], refs: list[str], tuned: list[str]) -> dict:
    """metrics.json as evaluate_run writes it: a base that answers nothing, the tuned answers, the baseline."""
    side = lambda loss, preds: {"loss": loss, "perplexity": math.exp(loss), **task_metrics(preds, refs, kind, pattern)}  # noqa: E731
    return {"base": side(3.0, [""] * len(refs)), "tuned": side(1.0, tuned),
            "baseline": baseline_scores(train, refs, kind, pattern, {"tuned": tuned}), "rows": len(refs)}


def _says_better(text: str) -> bool:
    return "better than a constant guess" in text or text.startswith("It worked")


def _tie_answers(rng: random.Random, kind: str, refs: list[str], answer: str, how: str) -> list[str]:
    """Return answers that tie the constant guess: exactly it, or it changed on a few rows where the changes
    cancel (one row made right for each row made as much worse) plus one row a little better: within noise."""
    pattern, _, fmt = KINDS[kind]
    tuned = [answer] * len(refs)
    if how == "exact":
        return tuned
    key = "price_mae" if kind == "price" else {"number": "number_mae", "exact_match": "exact_match",
                                                "regex": "regex_match"}[kind]
    score = row_scores(tuned, refs, kind, pattern)[key]
    wrong = [i for i, v in enumerate(score) if (v > 0 if key.endswith("_mae") else v == 0)]
    right = [i for i, v in enumerate(score) if i not in wrong]
    rng.shuffle(wrong), rng.shuffle(right)
    if fmt is None:  # labels: fix three wrong rows, break two right ones
        for i in wrong[:3]:
            tuned[i] = refs[i]
        for i in right[:2]:
            tuned[i] = "something else"
        return tuned
    value = parse_number(answer, pattern)
    pairs = list(zip(wrong[0:6:2], wrong[1:6:2]))
    for i, j in pairs:  # row i answered exactly, row j off by row i's old error more: the sum is unchanged
        tuned[i] = refs[i]
        ref_j = parse_number(refs[j], pattern)
        tuned[j] = fmt(value + score[i] if ref_j <= value else value - score[i])
    if len(wrong) > 6:  # one more row a little closer
        k = wrong[6]
        tuned[k] = fmt(value + (parse_number(refs[k], pattern) - value) * 0.5)
    return tuned


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("how", ["exact", "within-noise"])
def test_a_model_that_ties_the_constant_guess_is_never_called_better(kind, how):
    pattern, draw, _ = KINDS[kind]
    for seed in range(25):
        rng = random.Random(seed)
        train = [draw(rng) for _ in range(rng.randint(20, 300))]
        refs = [draw(rng) for _ in range(rng.randint(30, 200))]
        m = _metrics(kind, pattern, train, refs, _tie_answers(rng, kind, refs, constant_answer(train, kind, pattern), how))
        text = verdict(m)
        assert not _says_better(text), (kind, how, seed, text)
        assert "no better than always answering" in text
        key = next(k for k in m["baseline"]["margin"]["tuned"])
        row = next(r for r in metrics_table(m) if r["metric"].startswith(key + " "))
        assert not row["beats the guess?"].startswith("yes")


@pytest.mark.parametrize("kind", list(KINDS))
def test_better_is_said_only_when_the_gain_exceeds_two_standard_errors_computed_independently(kind):
    pattern, draw, _ = KINDS[kind]
    said = 0
    for seed in range(40):
        rng = random.Random(seed)
        train = [draw(rng) for _ in range(200)]
        refs = [draw(rng) for _ in range(rng.randint(20, 120))]
        right = rng.random()  # share of rows the "model" gets right; the rest it guesses at random
        tuned = [r if rng.random() < right else draw(rng) for r in refs]
        m = _metrics(kind, pattern, train, refs, tuned)
        if not _says_better(verdict(m)):
            continue
        said += 1
        key = next(k for k in m["baseline"]["margin"]["tuned"])
        ours = row_scores(tuned, refs, kind, pattern)[key]
        guess = row_scores([m["baseline"]["answer"]] * len(refs), refs, kind, pattern)[key]
        d = [a - b for a, b in zip(ours, guess) if not (math.isnan(a) or math.isnan(b))]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        gain = -mean if key.endswith("_mae") else mean
        assert gain > 2 * se and gain > 0, (seed, gain, se)
    assert said >= 5  # the property was exercised, not vacuous


def test_a_clear_win_is_reported_with_its_size():
    train = [f"Price is ${p}" for p in (10, 20, 30, 40, 50)]
    refs = [f"Price is ${p}" for p in (10, 50, 10, 50, 40, 20)]
    m = _metrics("price", None, train, refs, list(refs))
    text = verdict(m)
    assert text.startswith("It worked") and "better than a constant guess by 16.7" in text
    row = next(r for r in metrics_table(m) if r["metric"].startswith("price_mae"))
    assert row["constant guess"] == pytest.approx(16.666, abs=1e-2) and row["beats the guess?"].startswith("yes")
    loss_row = next(r for r in metrics_table(m) if r["metric"].startswith("loss"))
    assert loss_row["constant guess"] == "n/a" and loss_row["beats the guess?"] == "n/a"


def test_the_verdict_quotes_the_answer_it_is_no_better_than():
    train = ["Price is $30"] * 5
    refs = ["Price is $30", "Price is $31", "Price is $29"]
    text = verdict(_metrics("price", None, train, refs, ["Price is $30"] * 3))
    assert text.startswith("It did not learn the task") and "always answering 'Price is $30'" in text


def test_the_sweep_comparison_shows_the_constant_guess_beside_each_trial():
    from types import SimpleNamespace

    from lab_utils.sweep import sweep_table

    def trial(name, mae, beats):
        state = {"status": "done", "seconds": 60, "metrics": {
            "eval_loss": 1.0, "price_mae": mae, "price_parsed": 1.0,
            "baseline": {"answer": "Price is $60", "price_mae": 97.0, "beats": {"price_mae": beats}}}}
        return SimpleNamespace(name=name, settings={"train.learning_rate": 1e-3}, state=lambda: state)

    sweep = SimpleNamespace(spec={"select_by": "eval_loss"}, trials=[trial("a", 40.0, True), trial("b", 97.5, False)])
    rows = {r["trial"]: r for r in sweep_table(sweep)}
    assert rows["a"]["price_mae constant guess"] == 97.0 and rows["a"]["beats the guess?"] == "yes"
    assert rows["b"]["beats the guess?"] == "no"
    assert "baseline" not in rows["a"]  # the nested entry is shown as its columns, not as a dict


def test_the_task_metric_plot_draws_the_constant_guess_beside_base_and_tuned(tmp_path):
    import copy

    from lab_utils.config import DEFAULTS
    from lab_utils.plots import plot_task_metric
    from lab_utils.run import Run

    refs = ["Price is $10", "Price is $50", "Price is $30"]
    train = ["$10 to $50, say $30", "Price is $10", "Price is $50"]  # two "$" in a title would start mathtext
    m = _metrics("price", None, train, refs, ["Price is $12", "Price is $45", "Price is $30"])
    assert m["baseline"]["answer"] == train[0]
    path = plot_task_metric(Run(name="r", dir=tmp_path, cfg=copy.deepcopy(DEFAULTS)), m)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_embedded_pricer_sets_each_price_digit_from_one_word_and_a_constant_guess_is_far_off():
    from lab_utils.embedded import CATEGORIES, PACKS, TIERS, parse_price, pricer_rows

    rows = pricer_rows(400)
    for row in rows:
        question, answer = row["conversations"][1]["value"], row["conversations"][2]["value"]
        price = int(parse_price(answer))
        desc = question.splitlines()[1]
        assert CATEGORIES[next(c for c in CATEGORIES if f" {c} by " in desc)] == price // 100 * 100
        assert TIERS[desc.split()[0]] == price % 100 // 10 * 10
        assert PACKS[desc.rsplit(", ", 1)[1].rstrip(".")] == price % 10
    refs = [r["conversations"][2]["value"] for r in rows]
    guess = baseline_scores(refs, refs, "price")
    assert guess["price_mae"] > 150  # a model must read the description to get within half of this


def test_the_demo_summary_prints_the_baseline_beside_base_and_tuned():
    from lab_utils.__main__ import summary_lines

    train = [f"Price is ${p}" for p in (10, 20, 30, 40, 50)]
    refs = [f"Price is ${p}" for p in (10, 50, 10, 50, 40, 20)]
    lines = summary_lines(_metrics("price", None, train, refs, list(refs)))
    mae = next(x for x in lines if x.startswith("price_mae:"))
    assert "base 30.000 → tuned 0.000" in mae and "(baseline 16.667: always answering 'Price is $30')" in mae
    assert "baseline" not in next(x for x in lines if x.startswith("price_parsed:"))
    assert lines[-1].startswith("Verdict:          It worked") and "better than a constant guess by 16.7" in lines[-1]


@pytest.mark.parametrize("refs, kind", [
    (["Price is $120", "Price is $80"], "price"),
    (["42", "7.5"], "number"),
    (["yes", "no"], "exact_match"),
])
def test_a_sweep_ranks_by_the_metric_and_direction_03_reports(refs, kind):
    """05_sweep and 03_evaluate decide the metric and its direction in one place (they had drifted apart)."""
    import inspect

    from lab_utils import evaluation, sweep

    assert evaluation.metric_kind({"eval": {"metric": "auto"}}, refs) == kind
    source = inspect.getsource(sweep)
    assert "mt.metric_kind(" in source and "def _metric_kind" not in source and "def _lower_is_better" not in source
    for name in ("eval_loss", "loss", "perplexity", "price_mae", "number_mae", "number_error"):
        assert sweep.lower_is_better(name) and evaluation.lower_is_better(name)
    for name in ("exact_match", "price_parsed", "tool_call_match", "regex_match"):
        assert not sweep.lower_is_better(name)
