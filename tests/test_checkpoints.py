"""Checkpoint discovery, manifests, identity checks and pruning — on checkpoint folders made by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab_utils.checkpoints import (
    MANIFEST,
    REQUIRED_FILES,
    CheckpointCallback,
    check_checkpoint,
    choose_resume,
    delete_tree,
    prune_checkpoints,
    write_manifest,
)
from lab_utils.errors import LabError

IDENTITY = {"model": "m", "lora": {"r": 32}, "data_fingerprint": "abc", "effective_batch": 16}


def make_ckpt(folder: Path, step: int, *, manifest: bool = True, eval_loss: float | None = None, identity=None) -> Path:
    ck = folder / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (ck / name).write_bytes(b"x" * (100 + step))
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
