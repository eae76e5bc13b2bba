"""Colab as it really is, unit by unit: the run 00_setup chose, bf16 on a T4, unsloth first and the
same as the plain path, the install cell, resuming on other hardware, the chat widget, the README."""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import NOTEBOOKS, REPO
from lab_utils import environment
from lab_utils.errors import LabError

SMALL = {"model.max_length": 128, "data.limit": 200, "train.max_steps": 4}


# ── 1. the run set up in 00_setup is the one 01–05 open ─────────────────────────────────────────
def test_an_empty_run_name_opens_the_run_00_setup_set_up(lab_root, capsys):
    from lab_utils.run import start

    start("my-run", form=SMALL, quiet=True)
    capsys.readouterr()
    run = start("", create=False)
    assert run.name == "my-run"
    when = json.loads((lab_root / "current_run.json").read_text())["set_up"]
    assert f"Run my-run, set up in 00_setup on {when}" in capsys.readouterr().out


def test_a_run_name_without_a_run_is_refused_with_the_runs_there(lab_root):
    from lab_utils.run import start

    start("my-run", form=SMALL, quiet=True)
    with pytest.raises(LabError, match=r"there is no run 'pricer-demo' .*runs in .*: my-run"):
        start("pricer-demo", create=False, quiet=True)
    assert not (lab_root / "pricer-demo").exists()


def test_without_00_setup_an_empty_run_name_says_to_run_it(lab_root):
    from lab_utils.run import start

    with pytest.raises(LabError, match="run 00_setup first"):
        start("", create=False, quiet=True)
    start("my-run", form=SMALL, quiet=True)
    (lab_root / "current_run.json").write_text("{not json")
    with pytest.raises(LabError, match=r"current_run.json is damaged .* runs in .*: my-run"):
        start("", create=False, quiet=True)


def test_lab_run_name_still_wins_over_the_pointer(lab_root, monkeypatch):
    from lab_utils.run import start

    start("other", form=SMALL, quiet=True)
    start("my-run", form=SMALL, quiet=True)
    monkeypatch.setenv("LAB_RUN_NAME", "other")
    assert start("", create=False, quiet=True).name == "other"


def test_sweep_settings_go_into_an_untrained_runs_config_and_are_refused_once_it_trained(lab_root, capsys):
    from lab_utils.run import adopt_settings, start

    run = start("my-run", form=SMALL, quiet=True)
    assert adopt_settings(run, {"train.learning_rate": 3e-3, "lora.r": 8}, "Best settings (trial-002)")
    again = start("", create=False, quiet=True)
    assert (again.cfg["train"]["learning_rate"], again.cfg["lora"]["r"]) == (3e-3, 8)
    (run.dir / "checkpoints").mkdir()
    before = run.config_path.read_text()
    assert not adopt_settings(run, {"train.learning_rate": 1e-4}, "Best settings (trial-001)")
    assert run.config_path.read_text() == before
    assert "already has training results — to train them, set a new RUN_NAME" in capsys.readouterr().out


# ── 4. one bf16 decision, from the compute capability ───────────────────────────────────────────
def _gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """Answer torch.cuda's questions as a GPU would; is_bf16_supported() says True, as torch 2.13 does on a T4."""
    props = types.SimpleNamespace(name=name, total_memory=15_828_320_256, major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setenv("LAB_NO_UNSLOTH", "1")


@pytest.mark.parametrize("gpu, capability, bf16", [("Tesla T4", (7, 5), False), ("NVIDIA A100-SXM4-40GB", (8, 0), True)])
def test_bf16_follows_the_compute_capability_in_every_module(monkeypatch, gpu, capability, bf16):
    from lab_utils.defaults import detect_hardware
    from lab_utils.model import compute_dtype

    _gpu(monkeypatch, gpu, capability)
    assert environment.bf16_capable() is bf16
    assert compute_dtype() == (torch.bfloat16 if bf16 else torch.float16)
    assert detect_hardware().bf16 is bf16
    rows = dict(environment.environment_report())
    assert rows["bf16"] == ("yes" if bf16 else "no (fp16 will be used)")


# ── 2. unsloth first, or the plain path with one line ───────────────────────────────────────────
@pytest.fixture
def unsloth_package(tmp_path, monkeypatch):
    """Return a function writing a stand-in `unsloth` package with the given __init__ source, importable here."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(environment, "_unsloth_import", {})
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)

    def write(source: str) -> None:
        (tmp_path / "unsloth").mkdir(exist_ok=True)
        (tmp_path / "unsloth" / "__init__.py").write_text(source)

    return write


def test_an_unsloth_that_fails_to_import_means_the_plain_path_said_in_one_line(monkeypatch, unsloth_package, capsys):
    _gpu(monkeypatch, "Tesla T4", (7, 5))
    monkeypatch.delenv("LAB_NO_UNSLOTH")
    unsloth_package("raise ImportError('Unsloth: torch 2.15 is not supported')\n")
    path, why = environment.training_path()
    assert path == "plain" and "unsloth failed to import: ImportError: Unsloth: torch 2.15" in why
    assert capsys.readouterr().out.count("\n") == 1
    assert environment.training_path()[0] == "plain", "the outcome is kept: unsloth is not imported twice"


def test_unsloth_is_imported_by_start_on_a_gpu(monkeypatch, unsloth_package, lab_root):
    from lab_utils.run import start

    _gpu(monkeypatch, "Tesla T4", (7, 5))
    monkeypatch.delenv("LAB_NO_UNSLOTH")
    unsloth_package("import sys\nLATE = [m for m in ('transformers', 'trl', 'peft') if m in sys.modules]\n")
    late = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
    start("my-run", form=SMALL, quiet=True)
    assert sys.modules["unsloth"].LATE == late, "imported first thing in start(), before the config's checks"
    path, why = environment.training_path()
    assert path == "unsloth" and ("imported after" in why) == bool(late)


def test_lab_no_unsloth_never_imports_it(monkeypatch, unsloth_package):
    _gpu(monkeypatch, "Tesla T4", (7, 5))
    unsloth_package("raise AssertionError('imported')\n")
    assert environment.training_path() == ("plain", "plain transformers + peft + bitsandbytes (LAB_NO_UNSLOTH is set)")


# ── 5. the unsloth path trains what the plain path trains ───────────────────────────────────────
def _recording_unsloth(calls: list):
    """A stand-in unsloth: records its calls, loads with transformers + bitsandbytes and adds LoRA with peft."""
    from peft import LoraConfig, get_peft_model

    from lab_utils.model import load_base_model

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kwargs):
            calls.append(("from_pretrained", kwargs))
            cfg = {"model": {"name": kwargs["model_name"], "load_in_4bit": kwargs["load_in_4bit"], "max_length": 128}}
            return load_base_model(cfg, dtype=kwargs["dtype"]), None

        @staticmethod
        def get_peft_model(model, use_gradient_checkpointing=True, random_state=3407, max_seq_length=None, **lora):
            calls.append(("get_peft_model", lora))
            torch.manual_seed(random_state)
            return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))

    return types.SimpleNamespace(FastLanguageModel=FastLanguageModel)


@pytest.mark.slow
def test_the_unsloth_path_gets_every_lora_key_and_the_same_base_as_the_plain_path(monkeypatch):
    from lab_utils.config import resolve_config
    from lab_utils.model import compute_dtype, load_for_training, loaded_base

    cfg = resolve_config(form={**SMALL, "lora.use_dora": True, "lora.use_rslora": True,
                               "lora.init_lora_weights": "gaussian"})
    calls: list = []
    monkeypatch.setitem(sys.modules, "unsloth", _recording_unsloth(calls))
    fast, _ = load_for_training(cfg, "unsloth")
    plain, _ = load_for_training(cfg, "plain")
    (_, loaded), (_, lora) = calls
    assert loaded["use_exact_model_name"] is True and loaded["dtype"] == compute_dtype()
    assert lora["target_modules"] == "all-linear", "unsloth resolves all-linear itself, for any architecture"
    for key, value in cfg["lora"].items():
        assert lora[key] == value, key
    names = {n for n, _ in fast.named_modules() if n.endswith("lora_A")}
    assert names and names == {n for n, _ in plain.named_modules() if n.endswith("lora_A")}
    assert loaded_base(fast)["path"] == "unsloth" and loaded_base(plain)["path"] == "plain"
    assert loaded_base(fast)["base"] == loaded_base(plain)["base"]


def test_a_lora_key_unsloth_cannot_honour_is_refused(monkeypatch):
    from lab_utils.config import resolve_config
    from lab_utils.model import load_for_training

    cfg = resolve_config(form=SMALL)
    cfg["lora"]["task_type"] = "SEQ_CLS"
    monkeypatch.setitem(sys.modules, "unsloth", _recording_unsloth([]))
    with pytest.raises(LabError, match="lora.task_type 'SEQ_CLS'"):
        load_for_training(cfg, "unsloth")


# ── 3. the install cell keeps Colab's torch ─────────────────────────────────────────────────────
def _cell_commands(gpu: bool) -> list[list[str]]:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import colab_deps_check
    finally:
        sys.path.remove(str(REPO / "tools"))
    return colab_deps_check.cell_commands(gpu=gpu)


def test_the_install_cell_pins_the_vms_torch_and_installs_unsloth_without_its_deps():
    keep = ("torch", "torchvision", "torchaudio", "numpy")
    for gpu in (True, False):
        commands = _cell_commands(gpu)
        assert len(commands) == (2 if gpu else 1)
        for cmd in commands:
            constraints = Path(cmd[cmd.index("-c") + 1]).read_text().split()
            installed = {n: importlib.metadata.version(n) for n in keep if importlib.util.find_spec(n)}
            assert constraints == [f"{n}=={v}" for n, v in installed.items()]
            named = [a.split("==")[0].split(" @")[0].lower() for a in cmd[cmd.index("-c") + 2:]]
            assert not set(named) & {*keep, "xformers", "diffusers", "torchao", "torchvision"}, named
    unsloth = commands_gpu = _cell_commands(True)[1]
    assert "--no-deps" in commands_gpu and {"unsloth==2026.10.9", "unsloth_zoo==2026.10.9"} <= set(unsloth)


def test_setup_cell_installs_only_on_colab_and_reads_no_torch_version_of_its_own():
    cell = next(c for c in (NOTEBOOKS / "00_setup.py").read_text().split("# %%") if "REPO_URL =" in c)
    assert 'if "google.colab" in sys.modules' in cell
    assert not re.search(r"torch[a-z]*[=<>]=", cell), "versions of torch & co. come from the VM, never the cell"


# ── 6. another GPU after a reconnect ────────────────────────────────────────────────────────────
def test_packing_is_no_identity_key():
    from lab_utils.checkpoints import IDENTITY_KEYS, identity_changes

    assert "packing" not in IDENTITY_KEYS
    assert identity_changes({"packing": False, "effective_batch": 16}, {"packing": True, "effective_batch": 16}) == {}


@pytest.mark.parametrize("first, then", [("T4", "A100-40GB"), ("A100-40GB", "T4"), ("T4", "cpu")])
def test_a_run_resumes_on_other_hardware_with_its_first_packing_and_batch(lab_root, first, then):
    from lab_utils.checkpoints import REQUIRED_FILES, choose_resume, write_manifest
    from lab_utils.defaults import hardware_from_name
    from lab_utils.run import Run, start
    from lab_utils.training import effective_batch, run_identity, train_settings

    run = start("moved", form=SMALL, quiet=True)
    was = train_settings(run, hardware=hardware_from_name(first))
    ckpt = run.checkpoints_dir / "checkpoint-4"
    ckpt.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (ckpt / name).write_text("{}")
    import torch
    from safetensors.torch import save_file

    # a checkpoint is resumed only when its adapter loads and is finite
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 4)}, str(ckpt / "adapter_model.safetensors"))
    write_manifest(ckpt, run_identity(run, was.sft, "f1"))
    fresh = train_settings(Run(run.name, run.dir / "elsewhere", run.cfg), hardware=hardware_from_name(then))
    now = train_settings(run, hardware=hardware_from_name(then))
    assert (now.sft["packing"], now.sft["train_sampling_strategy"]) == (was.sft["packing"], was.sft["train_sampling_strategy"])
    assert effective_batch(now.sft) == effective_batch(was.sft)
    assert any("kept from checkpoint-4" in r for r in now.reasons) == (fresh.sft["packing"] != was.sft["packing"])
    if then != "cpu":  # a CPU runtime has no paged 8-bit optimizer: that resume is refused, naming optim
        assert choose_resume(run.checkpoints_dir, run_identity(run, now.sft, "f1")).checkpoint == ckpt
    else:
        with pytest.raises(LabError, match="optim"):
            choose_resume(run.checkpoints_dir, run_identity(run, now.sft, "f1"))


# ── 7. the chat widget renders on Colab ─────────────────────────────────────────────────────────
def test_colabs_custom_widget_manager_is_enabled_only_on_colab(monkeypatch):
    assert environment.enable_colab_widgets() is False  # not on Colab: nothing to do
    calls = []
    output = types.ModuleType("google.colab.output")
    output.enable_custom_widget_manager = lambda: calls.append(1)
    colab = types.ModuleType("google.colab")
    colab.output = output
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    assert environment.enable_colab_widgets() is True and calls == [1]
    assert "enable_colab_widgets()" in (REPO / "lab_utils" / "chatui.py").read_text()


# ── 8. the README says what to change for a real model, and where a GPU is needed ──────────────
def test_readme_lists_every_knob_of_00_setup_and_the_notebooks_that_need_no_gpu():
    readme = (REPO / "README.md").read_text()
    knobs = re.findall(r"^([A-Z_]+) = .*# @param", (NOTEBOOKS / "00_setup.py").read_text(), flags=re.M)
    assert len(knobs) >= 10
    section = readme[readme.index("## A real fine-tune"):]
    section = section[: section.index("\n## ", 3)]
    for knob in knobs:
        if knob not in ("RUN_NAME",):
            assert f"`{knob}`" in section, knob
    assert re.search(r"01_data.*04_export.*CPU runtime", section, flags=re.S)


# ── found by the simulated VM: the embedded data is rebuilt on every fresh VM ──────────────────
def test_the_embedded_datas_identity_survives_its_rebuild_on_a_new_vm():
    import os

    from lab_utils.config import resolve_config
    from lab_utils.data import _source_identity
    from lab_utils.embedded import resolve_data

    cfg = resolve_config(form=SMALL)
    before = _source_identity(cfg)
    built = Path(resolve_data(cfg["data"]["path"]))
    os.utime(built, ns=(1, 1))  # what a rebuild on a fresh VM changes
    assert _source_identity(cfg) == before and str(built.parent) not in json.dumps(before)
