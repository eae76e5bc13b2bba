"""config.py sits below the stages: it imports none of them, and the value lists it checks stay the stages' own."""

from __future__ import annotations

import subprocess
import sys

STAGES = ("chat", "data", "defaults", "embedded", "environment", "evaluation", "export", "model", "sweep", "training")


def test_importing_config_loads_no_stage_module():
    code = "import sys, lab_utils.config; print(' '.join(sorted(m for m in sys.modules if m.startswith('lab_utils.'))))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "lab_utils.config" in loaded
    assert not loaded & {f"lab_utils.{s}" for s in STAGES}, sorted(loaded)


def test_the_lists_config_checks_are_the_ones_the_stages_act_on():
    from lab_utils import chat, config, defaults, embedded, export, metrics

    assert config.PROFILE_NAMES == ("auto", *defaults.PROFILES)
    assert config.FORMATS == ("auto", *chat.FORMATS)
    assert set(config.METRICS) == set(metrics.METRICS)
    assert config.GGUF_TYPES[:-1] == export.CONVERTER_OUTTYPES and config.GGUF_TYPES[-1] in export.QUANTIZE_METHODS
    assert config.DEFAULTS["model"]["name"] == embedded.EMBEDDED_MODEL
    assert config.DEFAULTS["data"]["path"] in embedded.EMBEDDED_DATASETS


def test_the_profile_names_the_hardware_a_run_expects_and_adds_no_settings(tmp_path):
    """No "profile defaults" layer: the chooser sizes train: for the hardware found, whatever profile is named."""
    from lab_utils import config, defaults
    from lab_utils.run import Run
    from lab_utils.training import train_settings

    t4 = defaults.hardware_from_name("T4")
    plans = [train_settings(Run("r", tmp_path, config.merge_defaults({"profile": name})), hardware=t4)
             for name in config.PROFILE_NAMES]
    assert all(p == plans[0] for p in plans[1:])
    text = " ".join((config.__doc__ or "").split())
    assert "profile defaults" not in text and "LAB_PROFILE" in text
