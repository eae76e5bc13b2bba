"""pyproject.toml installs without setuptools' deprecation warnings."""

from __future__ import annotations

import tomllib

from conftest import REPO


def test_license_is_an_spdx_string_and_setuptools_is_new_enough_to_read_it():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"  # a table ({text = ...}) warns at every install
    assert any(r.replace(" ", "") == "setuptools>=77" for r in data["build-system"]["requires"])
