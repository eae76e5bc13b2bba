"""Checkpoint discovery, manifests, identity checks and pruning — on checkpoint folders made by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab_utils.checkpoints import (
    LOCK,
    MANIFEST,
    REQUIRED_FILES,
    CheckpointCallback,
    RunLock,
    check_checkpoint,
    choose_resume,
    delete_tree,
    prune_checkpoints,
    read_manifest,
    set_aside,
    verify_checkpoint,
    write_manifest,
)
from lab_utils.errors import LabError

IDENTITY = {"model": "m", "lora": {"r": 32}, "data_fingerprint": "abc", "effective_batch": 16}


def _adapter(path: Path, step: int, value: float = 0.5) -> None:
    """Write a real (tiny) LoRA safetensors file whose size grows with step."""
    import torch
    from safetensors.torch import save_file

    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.full((4, 4 + step), value)}, str(path))


def make_ckpt(folder: Path, step: int, *, manifest: bool = True, eval_loss: float | None = None, identity=None) -> Path:
    ck = folder / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (ck / name).write_bytes(b"x" * (100 + step))
    _adapter(ck / "adapter_model.safetensors", step)
    if manifest:
        write_manifest(ck, identity or IDENTITY, {"eval_loss": eval_loss} if eval_loss is not None else None)
    return ck


def test_resume_picks_highest_step_not_lexical_order(tmp_path):
    for step in (75, 100, 9):
        make_ckpt(tmp_path, step)
    plan = choose_resume(tmp_path, IDENTITY)
    assert plan.checkpoint.name == "checkpoint-100" and plan.step == 100


def test_resume_skips_checkpoint_without_manifest(tmp_path):
    make_ckpt(tmp_path, 50)
    make_ckpt(tmp_path, 100, manifest=False)
    plan = choose_resume(tmp_path, IDENTITY)
    assert plan.checkpoint.name == "checkpoint-50"
    assert any("checkpoint-100" in line and "no manifest" in line for line in plan.skipped)


@pytest.mark.parametrize("damage", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"])
def test_resume_skips_checkpoint_missing_a_file_after_the_manifest(tmp_path, damage):
    make_ckpt(tmp_path, 50)
    ck = make_ckpt(tmp_path, 100)
    (ck / damage).unlink()
    plan = choose_resume(tmp_path, IDENTITY)
    assert plan.checkpoint.name == "checkpoint-50"
    assert any(damage in line for line in plan.skipped)
    assert ck.exists(), "damaged folders are left untouched"


def test_resume_skips_zero_byte_adapter(tmp_path):
    make_ckpt(tmp_path, 50)
    ck = make_ckpt(tmp_path, 100)
    (ck / "adapter_model.safetensors").write_bytes(b"")
    assert "adapter_model.safetensors is 0 bytes" in check_checkpoint(ck)
    assert choose_resume(tmp_path, IDENTITY).checkpoint.name == "checkpoint-50"


def test_drive_sync_duplicates_are_named_and_ignored(tmp_path):
    make_ckpt(tmp_path, 300)
    dup = tmp_path / "checkpoint-400 (1)"
    dup.mkdir()
    plan = choose_resume(tmp_path, IDENTITY)
    assert plan.checkpoint.name == "checkpoint-300"
    assert any("checkpoint-400 (1)" in line and "duplicate" in line for line in plan.skipped)
    assert dup.exists()


def test_no_checkpoint_means_fresh_start(tmp_path):
    plan = choose_resume(tmp_path / "missing", IDENTITY)
    assert plan.checkpoint is None and plan.step == 0


def test_manifest_refuses_a_checkpoint_missing_required_files(tmp_path):
    ck = tmp_path / "checkpoint-5"
    ck.mkdir()
    (ck / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(LabError, match="missing"):
        write_manifest(ck, IDENTITY)
    assert not (ck / MANIFEST).exists()


@pytest.mark.parametrize(
    "changed,key",
    [
        ({"lora": {"r": 16}}, "lora"),
        ({"data_fingerprint": "zzz"}, "data_fingerprint"),
        ({"effective_batch": 32}, "effective_batch"),
        ({"model": "other"}, "model"),
    ],
)
def test_resume_refuses_identity_changes_naming_the_key(tmp_path, changed, key):
    make_ckpt(tmp_path, 10)
    with pytest.raises(LabError, match=rf"{key}.*new run_name"):
        choose_resume(tmp_path, {**IDENTITY, **changed})


def test_explicit_checkpoint_wins_over_newest(tmp_path):
    make_ckpt(tmp_path, 10)
    make_ckpt(tmp_path, 20)
    assert choose_resume(tmp_path, IDENTITY, "checkpoint-10").checkpoint.name == "checkpoint-10"


def test_explicit_incomplete_checkpoint_is_refused(tmp_path):
    make_ckpt(tmp_path, 10, manifest=False)
    with pytest.raises(LabError, match="no manifest"):
        choose_resume(tmp_path, IDENTITY, "checkpoint-10")


def test_prune_keeps_newest_and_best_and_never_touches_incomplete(tmp_path):
    make_ckpt(tmp_path, 10, eval_loss=0.5)
    make_ckpt(tmp_path, 20, eval_loss=0.1)  # the best
    make_ckpt(tmp_path, 30, eval_loss=0.4)
    make_ckpt(tmp_path, 40, eval_loss=0.3)
    make_ckpt(tmp_path, 50, eval_loss=0.6)
    partial = make_ckpt(tmp_path, 5, manifest=False)
    deleted = prune_checkpoints(tmp_path, keep=2, best=tmp_path / "checkpoint-20")
    assert sorted(p.name for p in deleted) == ["checkpoint-10", "checkpoint-30"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint-20", "checkpoint-40", "checkpoint-5", "checkpoint-50"]
    assert partial.exists()


def test_delete_on_drive_empties_files_before_removing(tmp_path, monkeypatch):
    ck = make_ckpt(tmp_path, 10)
    emptied = []
    import lab_utils.checkpoints as cp

    real = cp._empty_then_delete

    def spy(path):
        real(path)
        emptied.append(path.name)

    monkeypatch.setattr(cp, "_empty_then_delete", spy)
    delete_tree(ck, drive=True)
    assert not ck.exists()
    assert set(REQUIRED_FILES) <= set(emptied)


def test_delete_truncates_to_zero_bytes_so_hard_links_elsewhere_see_the_space_freed(tmp_path):
    ck = make_ckpt(tmp_path, 10)
    keep = tmp_path / "trash-copy"
    (ck / "optimizer.pt").link_to(keep) if hasattr(Path, "link_to") else keep.hardlink_to(ck / "optimizer.pt")
    delete_tree(ck, drive=True)
    assert keep.stat().st_size == 0, "Drive's trash would keep the bytes if the file were not emptied first"


class _State:
    def __init__(self, step):
        self.global_step, self.max_steps = step, 100


class _Control:
    should_save = False
    should_training_stop = False


class _Args:
    def __init__(self, out):
        self.output_dir = str(out)


def test_time_based_save_triggers_after_the_interval(tmp_path):
    cb = CheckpointCallback(IDENTITY, save_every_minutes=0.0001, keep=2)
    cb.on_train_begin(_Args(tmp_path), _State(0), _Control())
    import time

    time.sleep(0.02)
    ctl = cb.on_step_end(_Args(tmp_path), _State(1), _Control())
    assert ctl.should_save is True


def test_no_time_based_save_before_the_interval(tmp_path):
    cb = CheckpointCallback(IDENTITY, save_every_minutes=20, keep=2)
    cb.on_train_begin(_Args(tmp_path), _State(0), _Control())
    ctl = cb.on_step_end(_Args(tmp_path), _State(1), _Control())
    assert ctl.should_save is False


def test_low_disk_space_stops_before_writing_a_checkpoint(tmp_path):
    cb = CheckpointCallback(IDENTITY, save_every_minutes=20, keep=2, min_free_gib=10**6)
    ctl = _Control()
    ctl.should_save = True
    ctl = cb.on_step_end(_Args(tmp_path), _State(7), ctl)
    assert ctl.should_save is False and ctl.should_training_stop is True
    assert "free" in cb.stop_reason and "last complete one is intact" in cb.stop_reason


# ------------------------------------------------------------------ content checks (issue 14, case 1)


def test_manifest_records_a_sha256_of_every_file(tmp_path):
    import hashlib

    ck = make_ckpt(tmp_path, 10)
    digests = read_manifest(ck)["sha256"]
    assert set(REQUIRED_FILES) <= set(digests)
    assert digests["optimizer.pt"] == hashlib.sha256((ck / "optimizer.pt").read_bytes()).hexdigest()


def test_same_size_nan_adapter_is_skipped_for_the_previous_checkpoint(tmp_path):
    make_ckpt(tmp_path, 8)
    ck = make_ckpt(tmp_path, 9)
    size = (ck / "adapter_model.safetensors").stat().st_size
    _adapter(ck / "adapter_model.safetensors", 9, float("nan"))  # header intact, same size, NaN weights
    assert (ck / "adapter_model.safetensors").stat().st_size == size and check_checkpoint(ck) is None
    plan = choose_resume(tmp_path, IDENTITY)
    assert plan.checkpoint.name == "checkpoint-8"
    assert any(line.startswith("Skipping checkpoint-9: damaged — adapter_model.safetensors is not what was saved")
               for line in plan.skipped), plan.skipped
    assert plan.in_the_way == [ck], "training from step 8 would write into checkpoint-9: it must be moved aside"


def test_nan_adapter_is_refused_even_when_the_manifest_was_written_after_it(tmp_path):
    ck = make_ckpt(tmp_path, 9)
    _adapter(ck / "adapter_model.safetensors", 9, float("nan"))
    write_manifest(ck, IDENTITY)  # training diverged: the NaN weights were saved and hashed as they were
    assert "NaN/inf" in verify_checkpoint(ck)


def test_random_bytes_of_the_right_size_are_skipped_not_a_safetensor_traceback(tmp_path):
    import os

    make_ckpt(tmp_path, 8)
    ck = make_ckpt(tmp_path, 9)
    path = ck / "adapter_model.safetensors"
    path.write_bytes(os.urandom(path.stat().st_size))
    plan = choose_resume(tmp_path, IDENTITY)
    assert plan.checkpoint.name == "checkpoint-8"
    body = read_manifest(ck)
    body.pop("sha256")  # a manifest from before content hashes: loading the adapter still catches it
    (ck / MANIFEST).write_text(__import__("json").dumps(body))
    assert "does not load (SafetensorError" in verify_checkpoint(ck)


def test_a_damaged_optimizer_of_the_same_size_is_caught_by_its_hash(tmp_path):
    make_ckpt(tmp_path, 8)
    ck = make_ckpt(tmp_path, 9)
    (ck / "optimizer.pt").write_bytes(b"y" * (100 + 9))
    assert "optimizer.pt is not what was saved" in verify_checkpoint(ck)
    assert choose_resume(tmp_path, IDENTITY).checkpoint.name == "checkpoint-8"


def test_only_damaged_checkpoints_mean_a_fresh_start_with_all_of_them_in_the_way(tmp_path):
    ck = make_ckpt(tmp_path, 4)
    (ck / "scheduler.pt").write_bytes(b"z" * 104)
    stale = make_ckpt(tmp_path, 6, manifest=False)
    plan = choose_resume(tmp_path, IDENTITY)
    assert plan.checkpoint is None and "no complete checkpoint" in plan.message
    assert plan.in_the_way == [ck, stale]


def test_set_aside_moves_folders_out_of_checkpoints_keeping_every_byte(tmp_path):
    run = tmp_path / "run"
    ck = make_ckpt(run / "checkpoints", 8, manifest=False)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    (moved,) = set_aside(run, [ck])
    assert not ck.exists() and moved.parent == run / "set-aside" and moved.name.startswith("checkpoint-8-")
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == before
    assert choose_resume(run / "checkpoints", IDENTITY).skipped == []


def test_pruning_never_deletes_the_newest_checkpoint_that_verified(tmp_path):
    good = make_ckpt(tmp_path, 8)
    for step in (9, 10, 11):
        make_ckpt(tmp_path, step)
    deleted = prune_checkpoints(tmp_path, keep=2, protect=good)
    assert good.exists() and sorted(p.name for p in deleted) == ["checkpoint-9"]


def test_callback_protects_the_last_finite_checkpoint_when_training_turns_nan(tmp_path):
    cb = CheckpointCallback(IDENTITY, keep=1)
    for step in (2, 4, 6):
        ck = tmp_path / f"checkpoint-{step}"
        ck.mkdir()
        for name in REQUIRED_FILES:
            (ck / name).write_bytes(b"x" * 10)
        _adapter(ck / "adapter_model.safetensors", step, 0.5 if step == 2 else float("nan"))
        cb.finalize(ck, _State(step))
    assert (tmp_path / "checkpoint-2").exists(), "the last good checkpoint survives pruning"
    assert cb.verified == tmp_path / "checkpoint-2"


def test_checkpoints_being_a_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "checkpoints").write_text("oops")
    with pytest.raises(LabError, match=r"checkpoints is a file, not a folder — .*move or rename"):
        choose_resume(tmp_path / "checkpoints", IDENTITY)


def test_temporary_names_are_unique_per_write(tmp_path):
    from lab_utils.config import tmp_path as tmp_name

    a, b = tmp_name(tmp_path / MANIFEST), tmp_name(tmp_path / MANIFEST)
    assert a != b and str(__import__("os").getpid()) in a.name


# ------------------------------------------------------------------ one trainer per run (issue 14, case 3)


def _other_lock(run: Path, *, age: float, host: str = "other-vm", pid: int = 4242) -> None:
    import json
    import time

    run.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (run / LOCK).write_text(json.dumps({"pid": pid, "host": host, "started": now - 600, "heartbeat": now - age,
                                        "token": "theirs"}))


def test_second_trainer_is_refused_naming_the_holder(tmp_path):
    _other_lock(tmp_path, age=20)
    before = (tmp_path / LOCK).read_bytes()
    with pytest.raises(LabError, match=r"being trained by another process \(host other-vm, pid 4242, started "
                                       r"\d{4}-.* UTC, last heartbeat 2\d s ago\)"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK).read_bytes() == before


def test_stale_lock_is_taken_over_with_a_line(tmp_path):
    _other_lock(tmp_path, age=3600)
    lock = RunLock(tmp_path)
    note = lock.acquire()
    try:
        assert note.startswith("Taking over the training lock of a trainer that is gone (host other-vm, pid 4242")
        assert "no heartbeat for 60 min" in note
    finally:
        lock.release()
    assert not (tmp_path / LOCK).exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _other_lock(tmp_path, age=1, host=socket.gethostname(), pid=int(dead.stdout))
    lock = RunLock(tmp_path)
    assert "its process has ended" in lock.acquire()
    lock.release()


def test_heartbeat_is_rewritten_while_held_and_the_lock_released(tmp_path):
    import json
    import time

    lock = RunLock(tmp_path, heartbeat_s=0.05)
    assert lock.acquire() is None
    first = json.loads((tmp_path / LOCK).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK).read_text())["heartbeat"] > first
    lock.release()
    assert not (tmp_path / LOCK).exists()
