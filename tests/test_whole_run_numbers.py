"""After a resume, the printed train_loss and num_tokens are the whole run's (transformers/TRL count one session)."""

from __future__ import annotations

import pytest

from lab_utils.training import session_start

HISTORY = [  # logged every 5 steps; a validation entry in between; checkpoint at 12 (between two logs)
    {"step": 5, "loss": 2.0, "num_tokens": 500.0},
    {"step": 10, "loss": 1.0, "num_tokens": 1000.0},
    {"step": 10, "eval_loss": 1.5},
    {"step": 15, "loss": 0.5, "num_tokens": 1500.0},
]


def test_session_start_sums_each_logged_mean_over_its_steps():
    assert session_start(HISTORY, 10) == (10, 2.0 * 5 + 1.0 * 5, 1000.0)


def test_steps_after_the_last_log_count_at_the_last_logged_mean():
    step, loss_sum, tokens = session_start(HISTORY, 12)  # history past the checkpoint is not counted
    assert (step, tokens) == (12, 1000.0)
    assert loss_sum == pytest.approx(15.0 + 2 * 1.0)


def test_a_fresh_start_has_nothing_before_it():
    assert session_start([], 0) == (0, 0.0, 0.0)


