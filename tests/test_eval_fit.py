"""Evaluation that suits the data: the metric follows the answers, every knob is in the config, the two losses explained."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lab_utils.errors import LabError
from lab_utils.evaluation import eval_sample, loss_note, metric_kind, task_metrics, validation_sample

ALPACA = [
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make food.",
    "Here are three tips for staying healthy: eat a balanced diet, exercise regularly and sleep well.",
]


def test_auto_picks_word_overlap_for_free_text_and_exact_match_for_short_labels():
    assert metric_kind({"eval": {"metric": "auto"}}, ALPACA) == "overlap"
    assert metric_kind({"eval": {"metric": "auto"}}, ["positive", "negative", "neutral"]) == "exact_match"
    assert metric_kind({"eval": {"metric": "auto"}}, ["Price is $859"]) == "price"


def test_overlap_scores_free_text_where_exact_match_says_nothing():
    preds = ["Photosynthesis is how plants use sunlight to make food.", "Sleep well and exercise."]
    overlap = task_metrics(preds, ALPACA, "overlap")
    assert task_metrics(preds, ALPACA, "exact_match") == {"exact_match": 0.0}
    assert 0.3 < overlap["token_f1"] < 1.0 and 0.3 < overlap["rouge_l"] < 1.0


def test_eval_knobs_are_config_keys_with_checked_values():
    from lab_utils.config import merge_defaults, validate

    cfg = validate(merge_defaults({"eval": {"rows": 50, "checkpoints": "none", "max_new_tokens": 64}}))
    assert cfg["eval"]["rows"] == 50 and cfg["eval"]["checkpoints"] == "none"
    assert validate(merge_defaults({}))["eval"]["rows"] == 200
    assert validate(merge_defaults({"eval": {"rows": None}}))["eval"]["rows"] is None  # all rows
    with pytest.raises(LabError, match="eval.checkpoints"):
        validate(merge_defaults({"eval": {"checkpoints": "some"}}))
    with pytest.raises(LabError, match="eval.rows"):
        validate(merge_defaults({"eval": {"rows": 0}}))


def test_training_validates_on_the_rows_03_scores():
    from datasets import Dataset

    val = Dataset.from_dict({"i": list(range(500))})
    cfg = {"eval": {"rows": 40}, "data": {"seed": 7}}
    assert validation_sample(cfg, val)["i"] == eval_sample(500, 40, 7)
    assert len(validation_sample({"eval": {"rows": None}}, val)) == 500


def _run(tmp_path, history):
    (tmp_path / "log_history.json").write_text(json.dumps(history))
    return SimpleNamespace(dir=tmp_path)


def test_loss_note_explains_the_gap_and_names_an_earlier_step(tmp_path):
    run = _run(tmp_path, [{"step": 10, "loss": 2.0}, {"step": 20, "eval_loss": 1.8426}, {"step": 25, "loss": 1.5}])
    note = loss_note(run, {"tuned": {"loss": 1.7746}, "rows": 50, "tokens": 4000})
    assert note.startswith("Validation loss: 03's 1.7746 for the final adapter differs by 3.8% from the trainer's "
                           "eval_loss 1.8426 (step 20)")
    assert "per-batch means" in note and "4000 answer tokens of the same 50 rows" in note
    assert "measured at step 20, before the final step 25" in note


def test_loss_note_says_they_agree_and_is_silent_without_a_trainer_loss(tmp_path):
    run = _run(tmp_path, [{"step": 5, "loss": 2.0}, {"step": 5, "eval_loss": 2.5934}])
    assert " agrees with the trainer's eval_loss 2.5934 (step 5)" in loss_note(run, {"tuned": {"loss": 2.5930}})
    assert loss_note(_run(tmp_path, [{"step": 5, "loss": 2.0}]), {"tuned": {"loss": 2.0}}) is None
