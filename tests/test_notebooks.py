"""Notebook hygiene: pairs in sync, no outputs, allowed metadata only, one identical setup cell, badges."""

from __future__ import annotations

import json
import re

import jupytext
import pytest

from conftest import NOTEBOOKS, REPO

EXPECTED = ["00_setup", "01_data", "02_train", "03_evaluate", "04_export", "05_sweep"]
PAIRS = sorted(p.stem for p in NOTEBOOKS.glob("*.py"))
ALLOWED_METADATA = {"accelerator", "colab", "jupytext", "kernelspec", "language_info"}


def _cells(path):
    return [(c.cell_type, c.source.strip()) for c in jupytext.read(path).cells]


def _setup_cell(path) -> str:
    code = [src for kind, src in _cells(path) if kind == "code"]
    return next(src for src in code if "REPO_URL" in src)


def test_every_expected_notebook_exists_as_a_pair():
    for name in EXPECTED:
        assert (NOTEBOOKS / f"{name}.py").exists(), name
        assert (NOTEBOOKS / f"{name}.ipynb").exists(), name


@pytest.mark.parametrize("name", PAIRS)
def test_pair_is_in_sync(name):
    assert _cells(NOTEBOOKS / f"{name}.py") == _cells(NOTEBOOKS / f"{name}.ipynb"), (
        f"run `jupytext --sync notebooks/{name}.py`"
    )


@pytest.mark.parametrize("name", PAIRS)
def test_notebook_has_no_outputs_and_only_allowed_metadata(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{name}: a cell has outputs"
            assert cell.get("execution_count") is None
        assert not set(cell.get("metadata", {})) - {"tags", "id"}, f"{name}: cell metadata {cell['metadata']}"
    assert set(nb["metadata"]) <= ALLOWED_METADATA, set(nb["metadata"]) - ALLOWED_METADATA
    assert nb["metadata"]["accelerator"] == "GPU"
    assert nb["metadata"]["colab"]["gpuType"] == "T4"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert "widgets" not in json.dumps(nb["metadata"])


def test_setup_cell_is_identical_in_every_notebook():
    cells = {name: _setup_cell(NOTEBOOKS / f"{name}.py") for name in PAIRS}
    first = cells[PAIRS[0]]
    for name, cell in cells.items():
        assert cell == first, f"{name}'s setup cell differs from {PAIRS[0]}'s"


def test_repository_url_is_the_same_everywhere():
    url = re.search(r'REPO_URL = "([^"]+)"', _setup_cell(NOTEBOOKS / "00_setup.py")).group(1)
    assert f'Repository = "{url}"' in (REPO / "pyproject.toml").read_text()
    slug = url.removeprefix("https://github.com/")
    for name in PAIRS:
        text = (NOTEBOOKS / f"{name}.py").read_text()
        badge = f"colab.research.google.com/github/{slug}/blob/main/notebooks/{name}.ipynb"
        assert badge in text, f"{name}: Open-in-Colab badge missing or pointing elsewhere"
        assert badge in (REPO / "README.md").read_text(), f"README lacks the badge for {name}"


def test_setup_cell_never_installs_torch_and_only_installs_on_colab():
    cell = _setup_cell(NOTEBOOKS / "00_setup.py")
    assert '"google.colab" in sys.modules' in cell
    assert not re.search(r"torch[a-z]*\s*[=<>~]=", cell), "torch & co. appear only as constraints read from the VM"


@pytest.mark.parametrize("name", PAIRS)
def test_no_secret_or_remote_code_switch_in_notebooks(name):
    text = (NOTEBOOKS / f"{name}.py").read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{10,}", text)
    assert "trust_remote_code=True" not in text
