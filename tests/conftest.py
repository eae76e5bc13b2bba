"""Shared fixtures: a fresh runs folder, a stand-in for Colab's module, notebook helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

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


def run_script(name: str, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run notebooks/<name>.py as a plain script with `env` added; return the finished process."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    for var in ("LAB_CONFIG", "LAB_RUN_NAME"):
        if var not in env:
            full.pop(var, None)
    return subprocess.run(
        [sys.executable, str(NOTEBOOKS / f"{name}.py")], env=full, capture_output=True, text=True, timeout=timeout
    )
