"""Specification of lab_utils.hardware: the one module that asks torch.cuda about the device."""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import pytest

from lab_utils import defaults, environment, hardware

DEVICE_QUESTIONS = re.compile(
    r"(?<!`)torch\.cuda\.(is_available|get_device_capability|get_device_properties|is_bf16_supported)\("
)


def test_only_hardware_py_asks_torch_cuda_about_the_device():
    package = Path(hardware.__file__).parent
    askers = sorted(p.name for p in package.glob("*.py") if DEVICE_QUESTIONS.search(p.read_text()))
    assert askers == ["hardware.py"]


def test_moved_names_are_the_same_objects_in_their_old_modules():
    assert defaults.detect_hardware is hardware.detect_hardware
    assert defaults.hardware_from_name is hardware.hardware_from_name
    assert defaults.Hardware is hardware.Hardware
    assert environment.bf16_capable is hardware.bf16_capable


@pytest.mark.parametrize("capability, bf16", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_decided_by_compute_capability(capability, bf16):
    assert hardware.bf16_capable(capability) is bf16


def test_free_memory_collects_dropped_reference_cycles():
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the garbage collector frees it
    gone = weakref.ref(a)
    del a, b
    hardware.free_memory()
    assert gone() is None


def test_environment_report_takes_the_gpu_from_detect_hardware(monkeypatch):
    monkeypatch.setattr(hardware, "detect_hardware", lambda: hardware.hardware_from_name("T4"))
    monkeypatch.setattr(environment, "training_path", lambda: ("plain", "plain (test)"))
    rows = dict(environment.environment_report())
    assert rows["GPU"] == "Tesla T4"
    assert rows["compute capability"] == "7.5"
    assert rows["bf16"].startswith("no")


@pytest.mark.parametrize(
    "env, hub, datasets",
    [
        ({}, False, False),
        ({"HF_HUB_OFFLINE": "1"}, True, True),
        ({"HF_HUB_OFFLINE": "true"}, True, True),
        ({"HF_HUB_OFFLINE": "0"}, False, False),
        ({"HF_DATASETS_OFFLINE": "ON"}, False, True),  # datasets' own flag: for dataset ids only
    ],
)
def test_offline_is_parsed_once_for_models_and_datasets(monkeypatch, env, hub, datasets):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert environment.hub_offline() is hub
    assert environment.hub_offline(datasets=True) is datasets
