"""Free-form answers are scored by word overlap (token F1, ROUGE-L); exact match only for closed answers."""

from __future__ import annotations

import pytest

from lab_utils.overlap import closed_answers, overlap_scores, rouge_l, token_f1


def test_identical_answers_score_one_whatever_the_case_and_punctuation():
    assert token_f1("The cat sat.", "the cat sat") == 1.0
    assert rouge_l("The cat sat.", "the cat sat") == 1.0


def test_disjoint_answers_score_zero():
    assert token_f1("dogs bark", "the cat sat") == 0.0 and rouge_l("dogs bark", "the cat sat") == 0.0


def test_token_f1_ignores_order_and_rouge_l_does_not():
    assert token_f1("sat cat the", "the cat sat") == 1.0
    # longest common subsequence of [sat, cat, the] and [the, cat, sat] is one word: P = R = 1/3
    assert rouge_l("sat cat the", "the cat sat") == pytest.approx(1 / 3)


def test_partial_overlap_known_values():
    # 2 of 4 predicted words are in the 3-word reference: P = 1/2, R = 2/3 → F1 = 4/7
    assert token_f1("the cat is big", "the cat sat") == pytest.approx(4 / 7)
    assert rouge_l("the cat is big", "the cat sat") == pytest.approx(4 / 7)


def test_repeated_words_count_once_per_reference_occurrence():
    assert token_f1("yes yes yes yes", "yes") == pytest.approx(2 * 0.25 * 1 / 1.25)


def test_mean_over_rows_and_nothing_for_no_rows():
    scores = overlap_scores(["a b", "c"], ["a b", "d"])
    assert scores == {"token_f1": 0.5, "rouge_l": 0.5}
    assert overlap_scores([], []) == {}


@pytest.mark.parametrize("refs, closed", [
    (["positive", "negative", "neutral"], True),
    (["Paris", "The Eiffel Tower", "42"], True),
    (["Photosynthesis is the process by which green plants use sunlight to make food."], False),
    ([], False),
])
def test_closed_answers_are_short_ones(refs, closed):
    assert closed_answers(refs) is closed
