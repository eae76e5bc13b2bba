"""Watching training: the live view in a script and in a notebook, train.report_to, and a tracked run that
survives a SIGKILL with every step logged once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import NOTEBOOKS, run_script
from lab_utils import tracking
from lab_utils.errors import LabError
from lab_utils.live import LiveView, live_mode


class Clock:
    """A clock the test moves by hand, so speeds and times left are exact."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _resumed_state(step: int = 4, total: int = 10):
    """Return a TrainerState as the Trainer has it after loading checkpoint-<step> (its log history inside)."""
    from transformers import TrainerState

    state = TrainerState(global_step=step, max_steps=total)
    state.log_history = [{"loss": 5.0 - s / 2, "learning_rate": 1e-3, "step": s} for s in range(1, step + 1)]
    state.log_history.append({"eval_loss": 3.25, "step": step})
    return state


@pytest.fixture
def args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), report_to="none", logging_steps=1)


def test_script_mode_prints_one_line_per_log_with_step_speed_and_time_left(args, capsys):
    from transformers import TrainerControl

    clock = Clock()
    view = LiveView(title="r", mode="lines", clock=clock)
    state, control = _resumed_state(), TrainerControl()
    view.on_train_begin(args, state, control)
    begin = capsys.readouterr().out
    assert "continued from step 4: the curve includes 4 logged steps" in begin
    clock.now += 10.0
    state.global_step = 5
    view.on_log(args, state, control, logs={"loss": 2.125, "learning_rate": 5e-4, "num_tokens": 1000})
    line = capsys.readouterr().out.strip()
    # 1 step in 10 s → 5 steps left = 0:50; 1000 tokens in 10 s; validation loss from before the resume
    assert line == "step 5/10 · loss 2.1250 · val loss 3.2500 · lr 5.00e-04 · tokens/s 100 · time left 0:50"
    assert view.history[:5] == state.log_history[:5]  # the curve keeps the steps before the disconnect


def test_off_mode_shows_nothing(args, capsys):
    from transformers import TrainerControl

    view = LiveView(mode="off")
    state = _resumed_state()
    view.on_train_begin(args, state, TrainerControl())
    view.on_log(args, state, TrainerControl(), logs={"loss": 1.0})
    assert capsys.readouterr().out == ""


def test_live_mode_follows_lab_live_and_is_lines_outside_a_kernel(monkeypatch):
    monkeypatch.setenv("LAB_LIVE", "off")
    assert live_mode() == "off"
    monkeypatch.setenv("LAB_LIVE", "auto")
    assert live_mode() == "lines"  # pytest runs no IPython kernel


@pytest.fixture
def kernel_display():
    """An IPython shell whose display publisher records what a notebook would receive (IPython's public API)."""
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    sent: list[dict] = []

    class Recorder(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            sent.append({"data": data, "transient": transient or {}, "update": update})

    shell = InteractiveShell.instance()
    shell.display_pub = Recorder(shell=shell)
    yield sent
    InteractiveShell.clear_instance()


def test_notebook_mode_updates_one_output_in_place_and_throttles(args, kernel_display, capsys):
    from transformers import TrainerControl

    clock = Clock()
    view = LiveView(title="r", mode="notebook", min_interval=2.0, clock=clock)
    state, control = _resumed_state(), TrainerControl()
    view.on_train_begin(args, state, control)
    assert len(kernel_display) == 1 and not kernel_display[0]["update"]
    display_id = kernel_display[0]["transient"]["display_id"]
    first = kernel_display[0]["data"]["text/html"]
    assert "4/10" in first and "<img src='data:image/png;base64," in first  # resumed curve drawn at once
    for step in (5, 6):  # within 2 s of the last drawing: nothing sent
        clock.now += 0.5
        state.global_step = step
        view.on_log(args, state, control, logs={"loss": 2.0, "learning_rate": 5e-4})
    assert len(kernel_display) == 1
    clock.now += 2.0
    state.global_step = 7
    view.on_log(args, state, control, logs={"loss": 1.5, "learning_rate": 4e-4, "num_tokens": 300})
    view.on_train_end(args, state, control)
    assert [m["update"] for m in kernel_display] == [False, True, True]  # one output, updated in place
    assert {m["transient"]["display_id"] for m in kernel_display} == {display_id}
    last = kernel_display[-1]["data"]["text/html"]
    assert "7/10" in last and "1.5000" in last and "3.2500" in last and "0:03" in last  # 3 s for 3 steps, 3 left
    assert capsys.readouterr().out == ""  # no lines printed beside the display


@pytest.mark.parametrize("value, names", [("trackio", ["trackio"]), ("none", []), (None, []),
                                          (["wandb", "trackio", "wandb"], ["wandb", "trackio"])])
def test_report_to_accepts_the_four_trackers(value, names):
    assert tracking.check_report_to(value) == names


def test_report_to_typo_names_the_nearest_tracker():
    with pytest.raises(LabError, match=r"train.report_to must be one of trackio, tensorboard, wandb, none.*'wandbb'.*wandb"):
        tracking.check_report_to("wandbb")


def test_wandb_without_a_key_is_one_line_naming_colab_secrets(monkeypatch, fake_colab, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = SimpleNamespace(name="r", dir=Path("/nowhere/r"))
    with pytest.raises(LabError) as err:
        tracking.trainer_kwargs(run, {"report_to": "wandb"})
    assert "\n" not in str(err.value) and "WANDB_API_KEY" in str(err.value) and "Colab's secrets" in str(err.value)


def test_wandb_key_from_colab_secrets_is_used_and_never_printed(monkeypatch, fake_colab, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(fake_colab["secrets"], "WANDB_API_KEY", "secret-wandb-key-LABFAKE")
    monkeypatch.setattr("lab_utils.environment.in_colab", lambda: True)
    run = SimpleNamespace(name="r", dir=Path("/nowhere/r"))
    try:
        tracking.trainer_kwargs(run, {"report_to": "wandb"})
    except LabError as e:  # the key was found: what may remain missing is the package
        assert "pip install wandb" in str(e)
    else:
        assert os.environ["WANDB_RUN_ID"] == "r"
    assert "LABFAKE" not in capsys.readouterr().out


def test_tensorboard_writes_into_the_run_folder_or_names_the_package_to_install(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    run = SimpleNamespace(name="r", dir=tmp_path / "r")
    if any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        assert tracking.trainer_kwargs(run, {"report_to": "tensorboard"})["report_to"] == ["tensorboard"]
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "r" / "tracking" / "tensorboard" / "r")
    else:
        with pytest.raises(LabError, match="pip install tensorboard"):
            tracking.trainer_kwargs(run, {"report_to": "tensorboard"})


def test_trials_track_into_the_parent_run_grouped_under_its_sweep(tmp_path):
    run = SimpleNamespace(name="demo", dir=tmp_path / "demo")
    trial = SimpleNamespace(name="trial-001-lr1e-3", dir=tmp_path / "demo" / "sweep" / "trial-001-lr1e-3",
                            parent_data=tmp_path / "demo" / "data")
    assert tracking.tracking_dir(run) == tracking.tracking_dir(trial) == tmp_path / "demo" / "tracking"
    assert tracking.sweep_group(trial) == "demo-sweep" and tracking.sweep_group(run) is None


def test_dashboard_says_how_to_open_the_runs_tracked_data(tmp_path, capsys):
    run = SimpleNamespace(name="r", dir=tmp_path / "r", display=str)
    tracking.dashboard(run)
    assert "No tracked data yet" in capsys.readouterr().out
    (tmp_path / "r" / "tracking").mkdir(parents=True)
    (tmp_path / "r" / "tracking" / "qlora-lab.db").write_bytes(b"")
    cmd = tracking.dashboard(run)
    assert cmd == f'TRACKIO_DIR="{tmp_path / "r" / "tracking"}" trackio show --project qlora-lab'
    assert cmd in capsys.readouterr().out


def test_training_summary_is_not_a_tracked_step():
    rows = tracking._rows([{"loss": 1.0, "step": 3}, {"eval_loss": 0.5, "step": 3},
                           {"train_runtime": 9.0, "train_loss": 1.1, "epoch": 1.0, "step": 3}])
    assert [(s, tracking._kind(m)) for s, m in rows] == [(3, "train"), (3, "eval")]


def _trackio_args(tmp_path, name: str):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", run_name=name,
                             project=tracking.PROJECT, logging_steps=1)


def _log_rows(folder: Path, name: str, steps) -> None:
    """Write tracked rows for `steps` through trackio itself, as an earlier session did."""
    import trackio

    tracking._use_trackio_dir(folder)
    trackio.init(project=tracking.PROJECT, name=name, resume="allow", embed=False, auto_log_cpu=False)
    for s in steps:
        trackio.log({"train/loss": 10.0 + s, "train/global_step": s}, step=s)
    trackio.finish()


def test_resume_drops_rows_after_the_checkpoint_and_fills_missing_ones_before_it(tmp_path, capsys):
    from transformers import TrainerControl

    folder = tmp_path / "a" / "tracking"
    _log_rows(folder, "r", [1, 3, 4, 5, 6])  # step 2 never reached the database; 5 and 6 come after checkpoint-4
    cb = tracking._trackio_callback_class()(folder, None)
    state = _resumed_state(step=4, total=10)  # the checkpoint's history: loss at 1..4, validation at 4
    cb.on_train_begin(_trackio_args(tmp_path, "r"), state, TrainerControl())
    cb.on_train_end(_trackio_args(tmp_path, "r"), state, TrainerControl())
    rows = tracking._read(folder, "r")
    assert sorted(s for _, s, m in rows if "train/loss" in m) == [1, 2, 3, 4]
    assert [s for _, s, m in rows if "eval/loss" in m] == [4]
    assert next(m["train/loss"] for _, s, m in rows if s == 2) == 4.0  # from the checkpoint's log history
    assert "2 row(s) after step 4 dropped" in capsys.readouterr().out


def test_a_damaged_tracking_database_is_kept_aside_and_refilled_without_stopping_training(tmp_path, capsys):
    from transformers import TrainerControl

    folder = tmp_path / "c" / "tracking"
    _log_rows(folder, "r", [1, 2, 3, 4])
    db = folder / "qlora-lab.db"
    whole = db.read_bytes()
    db.write_bytes(whole[: len(whole) // 2])  # cut off by a disconnect or a Drive sync
    with pytest.raises(LabError, match="tracking database .* is damaged .* run 02_train again"):
        tracking._read(folder, "r")  # the dashboard's reader names the fix
    cb = tracking._trackio_callback_class()(folder, None)
    state = _resumed_state(step=4, total=10)
    cb.on_train_begin(_trackio_args(tmp_path, "r"), state, TrainerControl())
    cb.on_train_end(_trackio_args(tmp_path, "r"), state, TrainerControl())
    aside = list((folder.parent / "set-aside").glob("qlora-lab.db-*"))  # beside the checkpoints set aside
    assert len(aside) == 1 and aside[0].read_bytes() == whole[: len(whole) // 2]  # kept as it was
    assert sorted(s for _, s, m in tracking._read(folder, "r") if "train/loss" in m) == [1, 2, 3, 4]
    out = capsys.readouterr().out
    assert f"⚠ the tracking database was damaged: kept as set-aside/{aside[0].name}" in out


def test_fresh_start_keeps_an_earlier_tracked_run_under_another_name_in_a_second_folder(tmp_path, capsys):
    from transformers import TrainerControl, TrainerState

    _log_rows(tmp_path / "first" / "tracking", "other", [1])  # trackio already imported for another folder
    folder = tmp_path / "b" / "tracking"
    _log_rows(folder, "r", [1, 2])
    cb = tracking._trackio_callback_class()(folder, None)
    state = TrainerState(global_step=0, max_steps=10)
    cb.on_train_begin(_trackio_args(tmp_path, "r"), state, TrainerControl())
    cb.on_train_end(_trackio_args(tmp_path, "r"), state, TrainerControl())
    with sqlite3.connect(folder / "qlora-lab.db") as conn:
        names = {n for (n,) in conn.execute("SELECT DISTINCT run_name FROM metrics")}
    kept = [n for n in names if n.startswith("r-before-")]
    assert len(kept) == 1 and len(tracking._read(folder, kept[0])) == 2 and tracking._read(folder, "r") == []
    assert not (tmp_path / "first" / "tracking" / "qlora-lab.db").exists() or \
        tracking._read(tmp_path / "first" / "tracking", "r") == []  # nothing written into the other folder
    assert f"kept as {kept[0]!r}" in capsys.readouterr().out


# --- the story: SIGKILL mid-run, re-run, every step tracked exactly once ---------------------------------

def _tracked(db: Path, name: str) -> list[tuple[int, dict]]:
    with sqlite3.connect(db) as conn:
        return [(s, json.loads(m)) for s, m in conn.execute(
            "SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (name,))]


@pytest.mark.slow
def test_killed_and_resumed_run_tracks_every_step_exactly_once(tmp_path):
    """Kill 02_train (SIGKILL) once steps beyond a checkpoint reached trackio, lose a row before it, re-run:
    the tracked run holds steps 1..12 once each, validation every 3 steps, and the sweep's reader agrees."""
    steps = 12  # room for the tracker's background writer to lag behind training on a loaded machine
    cfg = {"run_name": "tracked", "data": {"limit": 120}, "model": {"max_length": 64},
           "train": {"max_steps": steps, "save_steps": 3, "logging_steps": 1, "learning_rate": 1e-3}}
    (tmp_path / "lab.yml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "LAB_ROOT": str(tmp_path / "runs"), "LAB_CONFIG": str(tmp_path / "lab.yml"),
           "PYTHONUNBUFFERED": "1", "LAB_CACHE": str(tmp_path / "cache")}  # no other process rewrites its data
    for name in ("00_setup", "01_data"):
        assert run_script(name, env).returncode == 0
    run_dir = tmp_path / "runs" / "tracked"
    db = run_dir / "tracking" / "qlora-lab.db"

    def newest_checkpoint() -> int:
        done = [int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*/lab_manifest.json")]
        return max(done, default=0)

    proc = subprocess.Popen([sys.executable, str(NOTEBOOKS / "02_train.py")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:  # kill once steps past a checkpoint reached trackio
        ckpt = newest_checkpoint()
        if 3 <= ckpt < steps and db.exists():
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                if (conn.execute("SELECT MAX(step) FROM metrics").fetchone()[0] or 0) > ckpt:
                    break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = newest_checkpoint()
    before = [s for s, m in _tracked(db, "tracked") if "train/loss" in m]
    assert 3 <= ckpt < steps and max(before) > ckpt, (ckpt, before)
    with sqlite3.connect(db) as conn:  # a row that never reached the database before the kill
        conn.execute("DELETE FROM metrics WHERE run_name = 'tracked' AND step = 2")

    second = run_script("02_train", env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"Resuming from checkpoint-{ckpt}" in second.stdout
    assert "dropped (redone now)" in second.stdout and "filled in from the checkpoint" in second.stdout
    assert f"continued from step {ckpt}: the curve includes {ckpt} logged steps" in second.stdout
    assert f"step {steps}/{steps} · loss" in second.stdout

    rows = _tracked(db, "tracked")
    assert sorted(s for s, m in rows if "train/loss" in m) == list(range(1, steps + 1))
    assert sorted(s for s, m in rows if "eval/loss" in m) == list(range(3, steps + 1, 3))
    run = SimpleNamespace(name="tracked", dir=run_dir)
    hist = json.loads((run_dir / "log_history.json").read_text())
    assert [(h["step"], h["loss"]) for h in tracking.history(run) if "loss" in h] == \
        [(h["step"], h["loss"]) for h in hist if "loss" in h]


def test_one_expected_time_line_from_steps_two_and_three_and_tokens_per_second_of_this_session(args, capsys):
    from transformers import TrainerControl

    clock = Clock()
    view = LiveView(title="r", mode="lines", clock=clock)
    state, control = _resumed_state(), TrainerControl()  # resumed at step 4 of 10
    state.log_history[-2]["num_tokens"] = 4000.0  # the whole run's count at the checkpoint
    view.on_train_begin(args, state, control)
    capsys.readouterr()
    for step, seconds in ((5, 30.0), (6, 9.0), (7, 4.0), (8, 4.0), (9, 4.0)):  # the first steps are slow (start-up)
        clock.now += seconds
        state.global_step = step
        view.on_step_end(args, state, control)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Expected time: 4.0 s per step (steps 3–4 timed) → about 0:08 "
                                                   "for the 2 steps left")
    view.on_log(args, state, control, logs={"loss": 1.0, "num_tokens": 4000.0 + 5100.0})
    assert "tokens/s 100 ·" in capsys.readouterr().out  # 5,100 tokens in this session's 51 s, not the run's 9,100


def test_with_gradient_accumulation_the_expected_time_comes_from_micro_batches(tmp_path, capsys):
    from transformers import TrainerControl, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", gradient_accumulation_steps=4)
    clock = Clock()
    view = LiveView(title="r", mode="lines", clock=clock)
    state, control = _resumed_state(), TrainerControl()  # resumed at step 4 of 10
    view.on_train_begin(args, state, control)
    capsys.readouterr()
    for seconds in (30.0, 9.0, 5.0, 5.0):  # the micro-batches of step 5: said before the step itself is over
        clock.now += seconds
        view.on_substep_end(args, state, control)
    # 5 s per micro-batch × 4 = 20 s per step; 6 steps less the one step done = 5 steps → 100 s
    assert capsys.readouterr().out.startswith("Expected time: 20.0 s per step (micro-batches 3–4 timed × "
                                              "accumulation 4) → about 1:40 for the 5 steps left")
