"""Session-wide test settings: notebooks executed by nbval write their runs to a temporary LAB_ROOT.

nbval runs the notebooks 00→05 in order, top to bottom, as a student would, but with a small-steps
config (LAB_CONFIG below): the same cells and contracts, seconds of training instead of minutes.
LAB_CONFIG is set only while a notebook's cells run (kernels start then and inherit it); the other
tests never see it.
"""

import os
import tempfile
from pathlib import Path

import pytest

# nbval's kernels inherit this environment: never write test runs into ./runs or a user's Drive.
os.environ["LAB_ROOT"] = tempfile.mkdtemp(prefix="lab-nbval-")
os.environ.pop("LAB_CONFIG", None)
os.environ.pop("LAB_RUN_NAME", None)
os.environ.setdefault("PYTHONUNBUFFERED", "1")
# Headless kernels have no one watching: the live training view prints lines there instead of updating a display.
os.environ.setdefault("LAB_LIVE", "lines")

# LAB_CONFIG replaces the notebooks' form fields (and 05_sweep's knobs): a run of 300 rows, 10 steps,
# checkpoints at 5 and 10, and a 2-trial sweep of 4 steps each on 100 rows.
NBVAL_CONFIG = """\
run_name: nbval
data: {limit: 300}
model: {max_length: 64}
train: {max_steps: 10, save_steps: 5, logging_steps: 5, learning_rate: 1.0e-3}
sweep:
  method: grid
  space: {train.learning_rate: [2.0e-4, 1.0e-3]}
  rows: 100
  max_steps: 4
  val_rows: 16
"""
_NBVAL_CONFIG_PATH = Path(os.environ["LAB_ROOT"]) / "nbval.yml"
_NBVAL_CONFIG_PATH.write_text(NBVAL_CONFIG)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Give notebook cells (and the kernel nbval starts for them) the small config; nothing else gets it."""
    if str(getattr(item, "path", "")).endswith(".ipynb"):
        os.environ["LAB_CONFIG"] = str(_NBVAL_CONFIG_PATH)
    else:
        os.environ.pop("LAB_CONFIG", None)
