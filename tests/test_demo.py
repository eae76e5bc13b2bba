"""The README's main command: `make demo` runs `python -m lab_utils demo` with LAB_ROOT=./runs (relative).

A relative runs folder once reached transformers' GGUF loader as a relative path, which it joined
and then looked up on the Hub (issue: make demo fails on a fresh clone). Every path the lab hands
to a library is now absolute; these tests run the demo's own command line with a relative LAB_ROOT.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

# The Makefile's own line, read so that a change to it is what gets tested.
MAKE_DEMO = re.search(r"^demo:.*\n\t(.+)$", (REPO / "Makefile").read_text(), re.M).group(1)


def test_make_demo_runs_the_package_demo_with_a_relative_default_runs_folder():
    assert "LAB_ROOT=$${LAB_ROOT:-./runs}" in MAKE_DEMO
    assert MAKE_DEMO.endswith("-m lab_utils demo")


def test_lab_root_from_a_relative_variable_is_absolute(monkeypatch, tmp_path):
    from lab_utils.environment import lab_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAB_ROOT", "./somewhere/runs")
    root, why = lab_root()
    assert root.is_absolute() and root == tmp_path / "somewhere" / "runs"
    assert str(root) in why


def test_local_model_and_data_paths_are_handed_on_absolute(monkeypatch, tmp_path):
    from lab_utils.embedded import resolve_data, resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "rows.jsonl").write_text('{"text": "x"}\n')
    assert resolve_model("models/mine") == str(tmp_path / "models" / "mine")
    assert resolve_data("rows.jsonl") == str(tmp_path / "rows.jsonl")
    # what does not exist here is a hub id and stays as it is
    assert resolve_model("org/model") == "org/model"


@pytest.mark.slow
def test_demo_command_with_a_relative_lab_root_runs_to_its_summary(tmp_path):
    """`LAB_ROOT=./<rel> python -m lab_utils demo` from the repository root, as `make demo` runs it."""
    cfg = tmp_path / "small.yml"
    # LAB_CONFIG replaces the notebooks' form fields: the same five notebooks, fewer steps
    cfg.write_text(yaml.safe_dump({"run_name": "rel-demo", "model": {"max_length": 128},
                                   "train": {"max_steps": 6, "save_steps": 3, "logging_steps": 3}}))
    rel = os.path.relpath(tmp_path / "runs", REPO)
    assert not Path(rel).is_absolute()
    env = {**os.environ, "LAB_ROOT": rel, "LAB_CONFIG": str(cfg), "PYTHONUNBUFFERED": "1"}
    env.pop("LAB_RUN_NAME", None)
    proc = subprocess.run([sys.executable, "-m", "lab_utils", "demo"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "━━━ Summary ━━━" in proc.stdout
    assert f"Run folder:       {tmp_path / 'runs' / 'rel-demo'}" in proc.stdout
    run = tmp_path / "runs" / "rel-demo"
    assert list((run / "export" / "gguf").glob("*.gguf"))
    assert (run / "export" / "README.md").is_file()  # the card is written after the GGUF read-back
