"""Colab as it really is: fresh VMs, reconnects and a T4, simulated (see colab_vm.py); one chain of stories.

A student sets knobs only in 00_setup, runs 01_data and a small 05_sweep, starts 02_train and is
disconnected (SIGKILL) after its first checkpoints. On a new VM — no variable, no file but Drive,
every other notebook unedited — 02_train resumes with the sweep's best settings, then 03 and 04 run
on the same run. A GPU VM (simulated T4) imports unsloth before transformers.
"""

from __future__ import annotations

import json

import pytest
import yaml
from colab_vm import Colab

pytestmark = pytest.mark.slow

RUN = "my-run"
KNOBS_00 = {  # the only edits: 00_setup's knobs, as plain assignments
    "RUN_NAME": RUN,
    "MAX_STEPS": 6,
    "SAVE_EVERY_MINUTES": 0.001,  # a checkpoint after every step, so the disconnect lands between two
    "LORA_R": 16,
}
KNOBS_05 = {  # a tiny sweep; its RUN_NAME stays empty
    "SPACE": {"train.learning_rate": [2e-4, 3e-3]},
    "ROWS": 48,
    "STEPS_PER_TRIAL": 2,
    "VAL_ROWS": 8,
    "SELECT_BY": "eval_loss",
}


def _ok(proc, name):
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _complete(run_dir):
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*/lab_manifest.json"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run the whole story once; return (colab, the VMs, each notebook's output)."""
    colab = Colab(tmp_path_factory.mktemp("colab"))
    out: dict[str, str] = {}
    vm1 = colab.connect()
    out["00"] = _ok(vm1.run("00_setup", KNOBS_00), "00_setup")
    out["01"] = _ok(vm1.run("01_data"), "01_data")
    out["05"] = _ok(vm1.run("05_sweep", KNOBS_05), "05_sweep")
    run_dir = vm1.runs / RUN
    vm1.kill_when("02_train", lambda: len(_complete(run_dir)) >= 2)
    killed_at = _complete(run_dir)
    vm2 = colab.connect()  # a new VM: fresh disk and environment, same Drive
    out["02"] = _ok(vm2.run("02_train"), "02_train after the reconnect")
    out["03"] = _ok(vm2.run("03_evaluate", {"EVAL_ROWS": 16}), "03_evaluate")  # RUN_NAME left empty
    vm3 = colab.connect()
    out["04"] = _ok(vm3.run("04_export"), "04_export")
    return colab, run_dir, killed_at, out


def test_knobs_set_only_in_00_setup_are_the_run_every_other_notebook_opens(chain):
    colab, run_dir, _, out = chain
    assert sorted(p.name for p in colab.drive.joinpath("MyDrive", "qlora-lab").iterdir() if p.is_dir()) == [RUN]
    pointer = json.loads((run_dir.parent / "current_run.json").read_text())
    assert pointer["run_name"] == RUN
    for nb in ("01", "05", "02", "03", "04"):
        assert f"Run {RUN}, set up in 00_setup on {pointer['set_up']}" in out[nb], nb
    assert (run_dir / "data" / "data_report.json").exists()
    assert (run_dir / "eval" / "metrics.json").exists()
    assert any((run_dir / "export").iterdir())


def test_a_disconnect_during_02_resumes_on_a_new_vm_from_the_newest_complete_checkpoint(chain):
    _, run_dir, killed_at, out = chain
    assert len(killed_at) >= 2
    assert f"Resuming from checkpoint-{killed_at[-1]} (step {killed_at[-1]} of 6" in out["02"]
    assert _complete(run_dir)[-1] == 6 and (run_dir / "adapter" / "adapter_model.safetensors").exists()
    identity = json.loads((run_dir / "checkpoints" / "checkpoint-6" / "lab_manifest.json").read_text())["identity"]
    assert identity["path"] == "plain" and identity["base"], "the path and the base loaded are recorded"
    assert identity["packing"] is False and identity["train_sampling_strategy"] == "group_by_length"


def test_the_sweeps_best_settings_are_what_02_trains_after_a_reconnect(chain):
    _, run_dir, _, out = chain
    assert "Best settings (trial-" in out["05"] and "applied to run 'my-run'" in out["05"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    best = yaml.safe_load((run_dir / "sweep" / "best_config.yaml").read_text())
    assert cfg["train"]["learning_rate"] == best["train"]["learning_rate"]
    assert cfg["lora"]["r"] == 16, "settings the sweep did not touch stay as 00_setup set them"
    assert "Config change accepted" not in out["02"], "02_train, unedited, trains the config on Drive as it is"


def test_a_name_that_is_no_run_is_refused_with_the_runs_on_drive(chain, tmp_path):
    colab, _, _, _ = chain
    vm = colab.connect()
    proc = vm.run("03_evaluate", {"RUN_NAME": "my-rnu"})
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "there is no run 'my-rnu'" in err and f"runs in {vm.runs}: {RUN}" in err
    assert not (vm.runs / "my-rnu").exists(), "no new demo run is made"


def test_on_a_t4_vm_unsloth_is_imported_before_transformers_and_bf16_is_off(tmp_path):
    # The simulated GPU stops at torch.cuda: bitsandbytes' CUDA backend cannot load on this machine, so
    # the VM runs what start() does before any config check (its first call), not a whole notebook.
    vm = Colab(tmp_path).connect(gpu="T4")
    cell = (
        "import lab_utils as lab\n"
        "from lab_utils import environment, run, model\n"  # every module start() needs, imported first
        "ok, why = environment.import_unsloth_first()\n"
        "print('dtype', model.compute_dtype())\n"
        "for what, value in environment.environment_report():\n"
        "    print(what, '|', value)\n"
    )
    out = _ok(vm.python(cell), "start()'s first steps on a simulated T4")
    imports = [e for e in vm.events() if e["event"] == "import unsloth"]
    assert imports == [{"event": "import unsloth", "already_imported": []}], "unsloth before transformers/trl/peft"
    assert "bf16 | no (fp16 will be used)" in out and "dtype torch.float16" in out
    assert "GPU | Tesla T4" in out and "training path | unsloth fast path (CUDA GPU and unsloth installed)" in out
    assert "Colab | yes" in out
