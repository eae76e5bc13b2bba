"""metrics.py is the one place that picks a run's metric and its direction, for 03_evaluate and 05_sweep alike."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lab_utils import evaluation, metrics, plots, sweep

_CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
_CALL2 = json.dumps({"name": "get_time", "arguments": {"tz": "UTC"}})


@pytest.mark.parametrize("refs, kind, key", [
    (["Price is $120", "Price is $80"], "price", "price_mae"),  # amounts
    (["42", "7.5", "-3"], "number", "number_mae"),  # bare numbers
    (["yes", "no", "yes"], "exact_match", "exact_match"),  # labels
    (["Paris", "Blue, mostly"], "exact_match", "exact_match"),  # short strings
    (["The capital of France is Paris.", "Blue, mostly"], "overlap", "rouge_l"),  # free text: word overlap (#18)
    ([_CALL, _CALL2], "tool_call", "tool_call_match"),  # tool calls
])
def test_evaluate_and_sweep_pick_the_same_metric_and_direction_for_the_same_data(refs, kind, key):
    cfg = {"eval": {"metric": "auto"}}
    # 03_evaluate (evaluation.evaluate_run) and 05_sweep (sweep._measure) both call metrics.metric_kind.
    assert evaluation.metric_kind(cfg, refs) == metrics.metric_kind(cfg, refs) == kind
    assert key in metrics.task_metrics(refs, refs, kind)
    # The sweep ranks trials by select_by in the direction 03's table calls "better".
    want_lower = key.endswith("_mae")
    assert metrics.lower_is_better(key) is want_lower
    best, worse = (0.1, 0.9) if want_lower else (0.9, 0.1)
    assert sweep.best_trial(_sweep(key, {"a": worse, "b": best})).name == "b"
    assert evaluation._better(key, best, worse) == "yes" and evaluation._better(key, worse, best) == "no"


@pytest.mark.parametrize("key, lower", [
    ("eval_loss", True), ("loss", True), ("perplexity", True), ("number_error", True), ("my_error", True),
    ("price_mae", True), ("exact_match", False), ("price_parsed", False), ("regex_found", False),
])
def test_every_module_ranks_a_metric_in_the_one_direction_metrics_py_gives(key, lower):
    assert metrics.lower_is_better(key) is lower
    assert sweep.best_trial(_sweep(key, {"a": 1.0, "b": 2.0})).name == ("a" if lower else "b")
    assert (evaluation._better(key, 1.0, 2.0) == "yes") is lower


def test_the_stages_hold_no_copy_of_the_metric_choice():
    import inspect

    for module in (evaluation, sweep, plots):
        source = inspect.getsource(module)
        assert "def metric_kind" not in source and "def lower_is_better" not in source
        assert "def _metric_kind" not in source and "def _lower_is_better" not in source
    assert evaluation.metric_kind is metrics.metric_kind and sweep.mt.lower_is_better is metrics.lower_is_better


def _sweep(metric: str, scores: dict[str, float]):
    def trial(name: str, value: float):
        state = {"status": "done", "metrics": {"eval_loss": 1.0, metric: value}}
        return SimpleNamespace(name=name, settings={}, state=lambda: state)

    return SimpleNamespace(spec={"select_by": metric}, trials=[trial(n, v) for n, v in scores.items()])
