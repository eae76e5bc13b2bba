"""Shared fixtures: a fresh runs folder, a stand-in for Colab's module, notebook helpers, one trained run."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


@pytest.fixture
def lab_root(tmp_path, monkeypatch) -> Path:
    """A fresh LAB_ROOT for one test, with no config or run name from the environment."""
    root = tmp_path / "runs"
    monkeypatch.setenv("LAB_ROOT", str(root))
    for var in ("LAB_CONFIG", "LAB_RUN_NAME", "LAB_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    return root


@pytest.fixture
def fake_colab(monkeypatch, tmp_path):
    """Install a stand-in `google.colab` (drive + userdata): the only thing the tests fake."""
    google = types.ModuleType("google")
    google.__path__ = []
    colab = types.ModuleType("google.colab")
    drive = types.ModuleType("google.colab.drive")
    userdata = types.ModuleType("google.colab.userdata")
    state = {"mounted": [], "secrets": {}, "fail": None}

    def mount(path, **kw):
        if state["fail"]:
            raise ValueError(state["fail"])
        state["mounted"].append(path)

    def get(name):
        if name not in state["secrets"]:
            raise KeyError(name)
        return state["secrets"][name]

    drive.mount = mount
    userdata.get = get
    colab.drive, colab.userdata = drive, userdata
    google.colab = colab
    import google as real_google  # protobuf's namespace package

    monkeypatch.setattr(real_google, "colab", colab, raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    return state


def run_script(name: str, env: dict[str, str], timeout: int | None = None) -> subprocess.CompletedProcess:
    """Run notebooks/<name>.py as a plain script with `env` added; return the finished process.

    timeout: seconds (default LAB_TEST_SCRIPT_TIMEOUT or 900; a machine shared by many runs needs more).
    """
    timeout = timeout or int(os.environ.get("LAB_TEST_SCRIPT_TIMEOUT") or 900)
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    for var in ("LAB_CONFIG", "LAB_RUN_NAME"):
        if var not in env:
            full.pop(var, None)
    return subprocess.run(
        [sys.executable, str(NOTEBOOKS / f"{name}.py")], env=full, capture_output=True, text=True, timeout=timeout
    )


# The end-to-end stories share one run made the way a user makes it: the notebooks as scripts, 00→04.
E2E_CONFIG = {
    "run_name": "e2e",
    "data": {"limit": 600},  # 570 training rows, 30 validation rows: enough to show learning, cheap to score
    "model": {"max_length": 128},
    "train": {"max_steps": 40, "save_steps": 20, "learning_rate": 1e-3, "logging_steps": 10},
}
E2E_NOTEBOOKS = ("00_setup", "01_data", "02_train", "03_evaluate", "04_export")


@dataclass
class TrainedRun:
    """A run trained by the notebooks as scripts: its folder, the env that names it, each script's output."""

    dir: Path
    env: dict[str, str]
    outputs: dict[str, subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """One run made by 00→04 as scripts under LAB_CONFIG (40 steps, checkpoints 20 and 40), shared by the stories.

    Tests only read it, or put back what they change; a test that needs it changed works on a copy.
    """
    root = tmp_path_factory.mktemp("e2e")
    cfg = root / "lab.yml"
    cfg.write_text(yaml.safe_dump(E2E_CONFIG))
    env = {"LAB_ROOT": str(root / "runs"), "LAB_CONFIG": str(cfg)}
    outputs = {}
    for name in E2E_NOTEBOOKS:
        proc = run_script(name, env)
        outputs[name] = proc
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return TrainedRun(root / "runs" / E2E_CONFIG["run_name"], env, outputs)
