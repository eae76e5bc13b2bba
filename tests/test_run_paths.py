"""Run owns its folder's paths and the one reader of 01_data's report."""

from __future__ import annotations

import pathlib

import pytest

from lab_utils.errors import LabError
from lab_utils.run import Run


def test_the_data_report_is_read_in_one_place(tmp_path):
    run = Run("r", tmp_path / "r", {})
    assert run.data_report() is None  # 01_data has not run: optional readers get None
    with pytest.raises(LabError, match="run 01_data first"):
        run.data_report(required=True)
    run.data_dir.mkdir(parents=True)
    run.data_report_path.write_text('{"fingerprint": "f1"}')
    assert run.data_report() == {"fingerprint": "f1"}
    run.data_report_path.write_text('{"fingerprint": ')  # cut off by a disconnect
    with pytest.raises(LabError, match="damaged — run 01_data again"):
        run.data_report()


def test_no_stage_opens_the_data_report_itself():
    package = pathlib.Path(__file__).resolve().parents[1] / "lab_utils"
    naming = [p.name for p in package.glob("*.py") if '"data_report.json"' in p.read_text() and p.name != "run.py"]
    assert naming == []

