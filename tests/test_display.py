"""Tables in a script: advice text is wrapped, never cut with "…"."""

from __future__ import annotations

from lab_utils.display import show_table, text_table

ADVICE = ("Recompute activations in the backward pass: ~30% slower, far less activation memory; "
          "turned on when the estimate does not fit")


def test_the_last_column_wraps_whole_words_and_keeps_every_word(capsys):
    show_table([{"key": "train.gradient_checkpointing", "value": "False", "why": ADVICE}], title="Settings")
    out = capsys.readouterr().out
    assert "…" not in out
    assert " ".join(out.split()).endswith(" ".join(ADVICE.split()))  # every word, in order
    lines = out.splitlines()
    assert lines[0] == "Settings" and all(len(line) <= 40 + 2 + 5 + 2 + 60 for line in lines)
    assert len(lines) > 4  # wrapped onto continuation lines under the last column


def test_continuation_lines_line_up_under_the_last_column():
    lines = text_table([["a", "x " * 40]], ["k", "why"], width=20)
    assert [line.index("x") for line in lines[2:]] == [3] * len(lines[2:])


def test_a_long_middle_cell_is_still_cut_to_keep_the_table_readable():
    lines = text_table([["p" * 100, "short"]], ["prompt", "answer"])
    assert lines[2].startswith("p" * 59 + "…")
