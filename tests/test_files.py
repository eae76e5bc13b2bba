"""files.py (write-then-rename) and errors.problem (the one error style)."""

from __future__ import annotations

import json
import os

import pytest

from lab_utils import files
from lab_utils.errors import LabError, problem


def test_write_json_leaves_only_the_target(tmp_path):
    out = files.write_json(tmp_path / "m.json", {"a": 1}, indent=2)
    assert json.loads(out.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = files.write_text(tmp_path / "state.txt", "old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        files.write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.txt"]


def test_temporary_names_differ_between_calls(tmp_path):
    a, b = files.tmp_path(tmp_path / "x"), files.tmp_path(tmp_path / "x")
    assert a != b and a.parent == b.parent == tmp_path and str(os.getpid()) in a.name


def test_problem_writes_what_got_fix_in_one_line():
    e = problem("train.learning_rate must be a number", got="'fast'", fix="e.g. 2e-4")
    assert isinstance(e, LabError)
    assert str(e) == "train.learning_rate must be a number, got 'fast' — e.g. 2e-4"
    assert str(problem("train.epochs must be positive", got=-1)) == "train.epochs must be positive, got -1"
    assert str(problem("no model", fix="set model.name")) == "no model — set model.name"


def test_only_files_py_writes_a_file_then_renames_it():
    """Every write-then-rename of a file goes through files.py; only whole folders are swapped elsewhere."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "lab_utils"
    # adapter/, dataset/, set-aside/ and the embedded model's folders, a .gguf's converted model folder; the GGUF
    # files llama.cpp's tools wrote
    folder_swaps = {"training.py": 3, "data.py": 1, "checkpoints.py": 1, "embedded.py": 1, "gguf.py": 1,
                    "gguf_source.py": 1}
    found = {p.name: len(re.findall(r"os\.replace\(|\btmp\.replace\(", p.read_text())) for p in package.glob("*.py")}
    assert {k: v for k, v in found.items() if v and k != "files.py"} == folder_swaps


def test_write_json_with_fsync_leaves_only_the_file(tmp_path):
    from lab_utils.files import write_json

    write_json(tmp_path / "manifest.json", {"a": 1}, fsync=True, sort_keys=True)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert (tmp_path / "manifest.json").read_text() == '{"a": 1}'
