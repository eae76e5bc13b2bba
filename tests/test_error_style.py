"""One error style: "what, got X — fix", written by errors.problem."""

from __future__ import annotations

import pathlib
import re

import pytest

from lab_utils.errors import LabError, problem

# defaults.py and the defaults CLI in __main__.py belong to the hardware/defaults split (#15a): its chooser's
# warnings and argparse messages still say "; fix:".
NOT_YET = {"defaults.py", "__main__.py"}


def test_no_module_writes_the_old_slash_or_semicolon_styles():
    package = pathlib.Path(__file__).resolve().parents[1] / "lab_utils"
    old = re.compile(r"/ got |/ fix:|; fix:|; got ")
    offenders = sorted(p.name for p in package.glob("*.py") if p.name not in NOT_YET and old.search(p.read_text()))
    assert offenders == []


def test_problem_can_raise_the_type_a_library_caller_catches():
    err = problem("on_too_long must be 'drop' or 'truncate'", got="'cut'", fix="pick one", kind=ValueError)
    assert type(err) is ValueError and not isinstance(err, LabError)
    assert str(err) == "on_too_long must be 'drop' or 'truncate', got 'cut' — pick one"


def test_a_bad_role_map_reaches_the_user_in_the_one_style_without_rewriting():
    from lab_utils.chat import _role_map

    with pytest.raises(ValueError) as err:
        _role_map({"bot": "robot"})
    assert str(err.value).startswith("data.role_map maps 'bot' to an unknown role, got 'robot' — map it to one of ")
