"""User story: the five notebooks run as plain scripts, in order, under the DESIGN.md contracts (the shared run)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import E2E_CONFIG, run_script

pytestmark = pytest.mark.slow


@pytest.fixture
def pipeline(trained_run):
    """The shared run made by 00→04 as scripts with LAB_ROOT and LAB_CONFIG: (run folder, env, outputs)."""
    return trained_run.dir, trained_run.env, trained_run.outputs


def test_scripts_leave_the_run_folder_of_the_contract(pipeline):
    run, _, _ = pipeline
    assert (run / "config.yaml").is_file()
    assert (run / "data" / "data_report.json").is_file()
    ckpts = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / "lab_manifest.json").is_file() for c in ckpts)
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "eval" / "metrics.json").is_file()
    assert list((run / "export" / "gguf").glob("*.gguf"))
    assert (run / "export" / "merged" / "model.safetensors").is_file()
    assert (run / "export" / "README.md").is_file()


def test_lab_config_replaces_the_notebook_form_fields(pipeline):
    run, _, _ = pipeline
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run_name"] == E2E_CONFIG["run_name"]
    assert saved["train"]["max_steps"] == E2E_CONFIG["train"]["max_steps"]
    assert saved["model"]["max_length"] == E2E_CONFIG["model"]["max_length"]
    # the notebook's form field says LEARNING_RATE = 1e-3 too, but its MAX_STEPS = 200 must not win
    assert saved["train"]["max_steps"] != 200


def test_tuned_model_beats_the_base_on_held_out_rows(pipeline):
    run, _, _ = pipeline
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["tuned"]["loss"] < 0.7 * m["base"]["loss"]
    assert m["tuned"]["price_parsed"] > m["base"]["price_parsed"]


def test_local_folder_is_announced_off_colab(pipeline):
    _, _, out = pipeline
    assert "Runs folder:" in out["00_setup"].stdout and "LAB_ROOT" in out["00_setup"].stdout


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def test_rerunning_a_finished_run_says_so_and_changes_nothing(pipeline, tmp_path):
    import shutil

    shared, env, _ = pipeline
    run = tmp_path / "runs" / shared.name  # a copy: should the re-run write, the shared run stays as it was
    shutil.copytree(shared, run)
    env = {**env, "LAB_ROOT": str(tmp_path / "runs")}
    steps = E2E_CONFIG["train"]["max_steps"]
    before = _snapshot(run)
    proc = run_script("02_train", env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"Run {shared.name} is finished: adapter at {run / 'adapter'}, step {steps} of {steps} — raise "
            "train.max_steps (or num_train_epochs) to continue") in proc.stdout
    assert "Resuming" not in proc.stdout and "Saved adapter" not in proc.stdout
    after = _snapshot(run)
    assert after.keys() == before.keys(), f"added {set(after) - set(before)}, removed {set(before) - set(after)}"
    assert [k for k in before if after[k] != before[k]] == [], "byte-identical run folder: no training, no pruning"
