"""User story: training interrupted anywhere resumes to exactly the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import NOTEBOOKS, run_script

pytestmark = pytest.mark.slow

FORM = {
    "data.limit": 240,  # 228 training rows, 15 steps per epoch: the stop at 20 falls inside epoch 2
    "model.max_length": 128,
    "train.max_steps": 30,
    "train.save_steps": 10,
    "train.learning_rate": 1e-3,
    "train.logging_steps": 5,
}


def _train(name: str, stop_at: int | None = None, form: dict | None = None, restart: bool = False):
    """Do what 02_train does, in-process; optionally stop (as a disconnect would) after step `stop_at`."""
    from transformers import TrainerCallback

    import lab_utils as lab

    run = lab.start(name, form={**FORM, **(form or {})}, restart=restart)
    tok = lab.load_tokenizer(run.cfg)
    ds = lab.prepare_data(run, tok)
    settings = lab.train_settings(run)
    model, tok = lab.load_for_training(run.cfg, "plain")
    trainer, callback = lab.build_trainer(run, model, tok, ds, settings)

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if stop_at and state.global_step >= stop_at:
                control.should_training_stop = True
            return control

    trainer.add_callback(StopAt())
    plan = lab.plan_resume(run, trainer, callback)
    lab.train(run, trainer, callback, plan, settings)
    if stop_at is None:
        lab.save_adapter(run, trainer, plan)
    return run, plan


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 30-step run: the reference every resumed run must equal."""
    root = tmp_path_factory.mktemp("straight")
    os.environ["LAB_ROOT"] = str(root)
    run, _ = _train("ref")
    return _adapter(run.dir), root


def _final(run_dir: Path, key: str) -> float:
    return [h[key] for h in json.loads((run_dir / "log_history.json").read_text()) if key in h][-1]


def test_stop_at_step_20_and_resume_gives_a_bit_identical_adapter_and_the_whole_runs_numbers(straight, lab_root, capsys):
    reference, root = straight
    run, _ = _train("resumed", stop_at=20)
    assert sorted(p.name for p in run.checkpoints_dir.iterdir() if p.is_dir())[-1] == "checkpoint-20"
    run, plan = _train("resumed")
    assert plan.checkpoint.name == "checkpoint-20"
    assert "Resuming from checkpoint-20 (step 20 of 30" in capsys.readouterr().out
    assert _max_diff(_adapter(run.dir), reference) == 0.0
    # transformers would report the last 10 steps' mean × 10/30 and TRL would count tokens from step 20
    assert _final(run.dir, "train_loss") == pytest.approx(_final(root / "ref", "train_loss"), rel=1e-4)
    assert _final(run.dir, "num_tokens") == _final(root / "ref", "num_tokens")
    assert not (run.checkpoints_dir / "README.md").exists()  # TRL's card ("fine-tuned version of None") is left out


def test_resume_skips_checkpoint_cut_off_mid_save(straight, lab_root, capsys):
    reference, _ = straight
    run, _ = _train("cut", stop_at=20)
    # a disconnect while checkpoint-20 was being written: the optimizer file is short, no manifest yet
    ck = run.checkpoints_dir / "checkpoint-20"
    (ck / "lab_manifest.json").unlink()
    (ck / "optimizer.pt").write_bytes((ck / "optimizer.pt").read_bytes()[:100])
    run, plan = _train("cut")
    out = capsys.readouterr().out
    assert "Skipping checkpoint-20: incomplete" in out
    assert plan.checkpoint.name == "checkpoint-10"
    assert _max_diff(_adapter(run.dir), reference) == 0.0
    from lab_utils.checkpoints import check_checkpoint

    assert check_checkpoint(ck) is None, "reaching step 20 again writes a complete checkpoint-20"
    (aside,) = (run.dir / "set-aside").glob("checkpoint-20-*")
    assert (aside / "optimizer.pt").stat().st_size == 100, "the cut-off folder was moved aside, not written into"


def test_same_size_nan_checkpoint_is_named_moved_aside_and_the_previous_one_resumed(straight, lab_root, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    reference, _ = straight
    run, _ = _train("nan", stop_at=20)
    path = run.checkpoints_dir / "checkpoint-20" / "adapter_model.safetensors"
    size = path.stat().st_size
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}, str(path),
              metadata={"format": "pt"})  # as PEFT writes it
    assert path.stat().st_size == size  # header intact, same size: the manifest's sizes alone would pass it
    run, plan = _train("nan")
    out = capsys.readouterr().out
    assert "Skipping checkpoint-20: damaged — adapter_model.safetensors is not what was saved" in out
    assert "Moved checkpoint-20 aside →" in out and "Resuming from checkpoint-10 (step 10 of 30" in out
    assert plan.checkpoint.name == "checkpoint-10"
    assert _max_diff(_adapter(run.dir), reference) == 0.0, "no NaN trained on: equal to the uninterrupted run"
    (aside,) = (run.dir / "set-aside").glob("checkpoint-20-*")
    assert torch.isnan(next(iter(load_file(str(aside / "adapter_model.safetensors")).values()))).all()


def test_changed_lora_rank_is_refused_on_rerun_with_the_changed_key_named(lab_root):
    import lab_utils as lab

    _train("shape", stop_at=10)
    with pytest.raises(lab.LabError, match=r"lora\.r: 32 → 16.*new run_name.*RESTART"):
        lab.start("shape", form={**FORM, "lora.r": 16})


def test_explicit_restart_moves_old_checkpoints_aside_and_starts_fresh(lab_root):
    run, _ = _train("again", stop_at=10)
    run, plan = _train("again", form={"lora.r": 16}, restart=True, stop_at=10)
    assert plan.checkpoint is None
    previous = list(run.dir.glob("previous-*/checkpoints/checkpoint-10"))
    assert previous, "the earlier checkpoints are kept, not deleted"


def _newest_manifest(folder: Path) -> int:
    steps = [int(p.parent.name.split("-")[1]) for p in folder.glob("checkpoint-*/lab_manifest.json")]
    return max(steps, default=0)


def test_script_killed_mid_run_and_mid_save_resumes_to_the_uninterrupted_adapter(straight, tmp_path):
    """SIGKILL the training script as soon as checkpoint-20 appears (mid-save), then once more at a
    random later moment; each re-run resumes and the final adapter equals the uninterrupted one."""
    reference, _ = straight
    cfg = {
        "run_name": "killed",
        "data": {"limit": 240},
        "model": {"max_length": 128},
        "train": {"max_steps": 30, "save_steps": 10, "learning_rate": 1e-3, "logging_steps": 5},
    }
    (tmp_path / "lab.yml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "LAB_ROOT": str(tmp_path / "runs"), "LAB_CONFIG": str(tmp_path / "lab.yml"), "PYTHONUNBUFFERED": "1"}
    for name in ("00_setup", "01_data"):
        assert run_script(name, env).returncode == 0
    ckdir = tmp_path / "runs" / "killed" / "checkpoints"

    proc = subprocess.Popen([sys.executable, str(NOTEBOOKS / "02_train.py")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (ckdir / "checkpoint-20").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    second = run_script("02_train", env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Resuming from checkpoint-" in second.stdout
    assert _max_diff(_adapter(tmp_path / "runs" / "killed"), reference) <= 1e-6


def test_emptied_largest_file_of_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path):
    reference, _ = straight
    cfg = {
        "run_name": "emptied",
        "data": {"limit": 240},
        "model": {"max_length": 128},
        "train": {"max_steps": 30, "save_steps": 10, "learning_rate": 1e-3, "logging_steps": 5},
    }
    (tmp_path / "lab.yml").write_text(yaml.safe_dump(cfg))
    env = {"LAB_ROOT": str(tmp_path / "runs"), "LAB_CONFIG": str(tmp_path / "lab.yml")}
    for name in ("00_setup", "01_data", "02_train"):
        assert run_script(name, env).returncode == 0
    run_dir = tmp_path / "runs" / "emptied"
    newest = run_dir / "checkpoints" / "checkpoint-30"
    largest = max((p for p in newest.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(b"")
    (run_dir / "adapter").rename(run_dir / "adapter-first")
    proc = run_script("02_train", env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Skipping checkpoint-30: incomplete" in proc.stdout
    assert "Resuming from checkpoint-20 (step 20 of 30" in proc.stdout
    assert _max_diff(_adapter(run_dir), reference) <= 1e-6


def test_stop_button_saves_a_complete_checkpoint_before_training_stops(lab_root, capsys):
    from transformers import TrainerCallback

    import lab_utils as lab
    from lab_utils.checkpoints import check_checkpoint

    run = lab.start("stopped", form=FORM)
    tok = lab.load_tokenizer(run.cfg)
    ds = lab.prepare_data(run, tok)
    settings = lab.train_settings(run)
    model, tok = lab.load_for_training(run.cfg, "plain")
    trainer, callback = lab.build_trainer(run, model, tok, ds, settings)

    class PressStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 12:
                raise KeyboardInterrupt  # what Colab's stop button delivers

    trainer.add_callback(PressStop())
    with pytest.raises(KeyboardInterrupt):
        lab.train(run, trainer, callback, lab.plan_resume(run, trainer, callback), settings)
    ck = run.checkpoints_dir / "checkpoint-12"
    assert check_checkpoint(ck) is None, "the checkpoint saved on stop is complete"
    assert "Stopped at step 12: saved checkpoint-12" in capsys.readouterr().out
    assert json.loads((run.dir / "log_history.json").read_text()), "the loss history is kept"


_SAVE_ADAPTER_CONFIG = """
import sys
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from lab_utils.embedded import EMBEDDED_MODEL, resolve_model
from lab_utils.training import _canonical_target_modules
model = AutoModelForCausalLM.from_pretrained(str(resolve_model(EMBEDDED_MODEL)))
model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
_canonical_target_modules(model)  # what build_trainer does before the first checkpoint
model.save_pretrained(sys.argv[1])
"""


def test_adapter_config_is_byte_identical_across_processes(tmp_path):
    # PEFT keeps target_modules as a set: its order followed each process's string hashing, so a checkpoint
    # written before a disconnect and the final adapter written after it differed, and 03 compared them
    configs = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        proc = subprocess.run([sys.executable, "-c", _SAVE_ADAPTER_CONFIG, str(out)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        configs.append((out / "adapter_config.json").read_bytes())
    assert configs[0] == configs[1]
