"""Checkpoints that survive a disconnect: complete-only discovery, manifests, safe resume, Drive-aware pruning.

The Trainer saves and restores checkpoints itself; this module adds what it lacks:
- a manifest (file names and sizes, plus the run's identity) written *after* every file of a
  checkpoint, so a checkpoint cut off mid-save is never taken for a complete one;
- discovery by step number (not a lexical sort), naming every partial, damaged or duplicate
  folder in one line and leaving it untouched;
- a refusal to resume when the run's identity (model, LoRA shape, data, effective batch) changed;
- time-based saves, a free-space check before each save, and pruning that empties files before
  deleting them on Drive (Drive's trash would otherwise keep counting against the quota).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .environment import free_gib, on_drive
from .errors import LabError

__all__ = [
    "MANIFEST",
    "REQUIRED_FILES",
    "write_manifest",
    "check_checkpoint",
    "scan_checkpoints",
    "choose_resume",
    "prune_checkpoints",
    "delete_tree",
    "CheckpointCallback",
    "ResumePlan",
]

MANIFEST = "lab_manifest.json"
# What a Trainer checkpoint of a PEFT model needs for an exact resume.
REQUIRED_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "rng_state.pth",
)
_NAME = re.compile(r"^checkpoint-(\d+)$")


def write_manifest(ckpt: Path, identity: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ckpt/lab_manifest.json listing every file and size (written last, atomically); return its path."""
    files = {
        str(p.relative_to(ckpt)): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    }
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise LabError(f"checkpoint {ckpt.name} is missing {missing} right after saving — disk full? Check free space")
    body = {"files": files, "identity": identity, "written": time.time(), **(extra or {})}
    tmp = ckpt / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / MANIFEST)
    return ckpt / MANIFEST


def check_checkpoint(ckpt: Path) -> str | None:
    """Return None if ckpt is complete (manifest present, every file there with its size), else the reason."""
    man = ckpt / MANIFEST
    if not man.exists():
        return "no manifest (cut off while saving?)"
    try:
        body = json.loads(man.read_text())
        files = body["files"]
    except (OSError, ValueError, KeyError):
        return "manifest unreadable"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"manifest lacks {name}"
    for name, size in files.items():
        p = ckpt / name
        if not p.exists():
            return f"{name} missing"
        actual = p.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, manifest says {size}"
    return None


def read_manifest(ckpt: Path) -> dict:
    """Return the manifest of a checkpoint ({} when unreadable)."""
    try:
        return json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def scan_checkpoints(folder: Path) -> tuple[list[tuple[int, Path]], list[str]]:
    """Return (complete checkpoints sorted by step, one line per folder that is skipped and why)."""
    complete: list[tuple[int, Path]] = []
    skipped: list[str] = []
    if not folder.exists():
        return complete, skipped
    for p in sorted(folder.iterdir()):
        if not p.is_dir():
            continue
        m = _NAME.match(p.name)
        if not m:
            if p.name.startswith("checkpoint"):
                skipped.append(f"Skipping {p.name}: not a Trainer checkpoint name (a Drive sync duplicate?) — left untouched")
            continue
        reason = check_checkpoint(p)
        if reason:
            skipped.append(f"Skipping {p.name}: incomplete — {reason}; left untouched")
        else:
            complete.append((int(m.group(1)), p))
    complete.sort(key=lambda x: x[0])
    return complete, skipped


# Not packing: the hardware chooses it, and a resume on other hardware keeps the run's first choice (training.py).
IDENTITY_KEYS = ("model", "max_length", "lora", "data_fingerprint", "effective_batch", "optim", "load_in_4bit")


def identity_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Return {key: (saved, current)} for identity fields that differ (missing saved fields are ignored)."""
    return {
        k: (saved.get(k), current.get(k))
        for k in IDENTITY_KEYS
        if k in saved and k in current and saved.get(k) != current.get(k)
    }


@dataclass
class ResumePlan:
    """Where training starts: a checkpoint folder (or None for a fresh start) and why."""

    checkpoint: Path | None
    step: int = 0
    message: str = ""
    skipped: list[str] = field(default_factory=list)
    seconds_per_step: float | None = None


def choose_resume(folder: Path, identity: dict, explicit: str | Path | None = None) -> ResumePlan:
    """Return the ResumePlan: explicit checkpoint > newest complete one > fresh start; refuse identity changes."""
    complete, skipped = scan_checkpoints(folder)
    if explicit:
        p = Path(explicit)
        if not p.is_absolute():
            p = folder / p
        reason = check_checkpoint(p) if p.exists() else "does not exist"
        if reason:
            raise LabError(f"resume checkpoint {str(p)!r} cannot be used: {reason} — pick one of {[c.name for _, c in complete]}")
        m = _NAME.match(p.name)
        chosen: tuple[int, Path] | None = (int(m.group(1)) if m else 0, p)
        why = "explicit choice"
    elif complete:
        chosen = complete[-1]
        why = "newest complete checkpoint"
    else:
        chosen = None
        why = "no complete checkpoint" if skipped else "no checkpoint yet"
    if chosen is None:
        return ResumePlan(None, 0, f"Starting fresh ({why}).", skipped)
    step, path = chosen
    man = read_manifest(path)
    changes = identity_changes(man.get("identity", {}), identity)
    if changes:
        listed = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changes.items())
        raise LabError(
            f"{path.name} was trained with other settings ({listed}) — resuming would mix two runs: "
            "use a new run_name, or restart explicitly (RESTART = True in 02_train)"
        )
    sps = man.get("seconds_per_step")
    return ResumePlan(path, step, f"({why})", skipped, sps)


def _empty_then_delete(path: Path) -> None:
    if path.is_file() or path.is_symlink():
        try:
            with open(path, "r+b") as f:
                f.truncate(0)
        except OSError:
            pass
        path.unlink(missing_ok=True)


def delete_tree(path: Path, *, drive: bool | None = None) -> None:
    """Delete a folder; on Drive, empty every file first so the trash does not keep its bytes."""
    drive = on_drive(path) if drive is None else drive
    if drive:
        for p in sorted(path.rglob("*"), reverse=True):
            if p.is_file():
                _empty_then_delete(p)
    shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(folder: Path, keep: int | None, best: Path | None = None, *, drive: bool | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep` (never `best`, never incomplete ones); return those deleted."""
    if not keep or keep <= 0:
        return []
    complete, _ = scan_checkpoints(folder)
    keepers = {p for _, p in complete[-keep:]}
    if best is not None:
        keepers.add(best)
    deleted = []
    for _, p in complete:
        if p not in keepers:
            delete_tree(p, drive=drive)
            deleted.append(p)
    return deleted


def _best_checkpoint(folder: Path) -> Path | None:
    complete, _ = scan_checkpoints(folder)
    scored = [(read_manifest(p).get("eval_loss"), p) for _, p in complete]
    scored = [(loss, p) for loss, p in scored if isinstance(loss, (int, float))]
    return min(scored, key=lambda x: x[0])[1] if scored else None


def _transformers_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class CheckpointCallback(_transformers_callback_base()):  # type: ignore[misc]
    """Trainer callback: manifests after each save, time-based saves, free-space checks, pruning."""

    def __init__(
        self,
        identity: dict,
        *,
        save_every_minutes: float | None = 20.0,
        keep: int | None = 2,
        min_free_gib: float = 0.5,
        drive: bool | None = None,
    ):
        self.identity = identity
        self.save_every = (save_every_minutes or 0) * 60
        self.keep = keep
        self.min_free_gib = min_free_gib
        self.drive = drive
        self.last_save = time.monotonic()
        self.start_time = time.monotonic()
        self.start_step = 0
        self.last_eval: dict[int, float] = {}
        self.stop_reason: str | None = None
        self.last_checkpoint_bytes = 0

    def on_train_begin(self, args, state, control, **kw):
        self.last_save = self.start_time = time.monotonic()
        self.start_step = state.global_step

    def _seconds_per_step(self, state) -> float | None:
        done = state.global_step - self.start_step
        return (time.monotonic() - self.start_time) / done if done > 0 else None

    def on_step_end(self, args, state, control, **kw):
        if self.save_every and time.monotonic() - self.last_save >= self.save_every:
            control.should_save = True
        if control.should_save:
            folder = Path(args.output_dir)
            need = max(self.min_free_gib, 1.5 * self.last_checkpoint_bytes / 2**30)
            free = free_gib(folder)
            if free < need:
                control.should_save = False
                control.should_training_stop = True
                self.stop_reason = (
                    f"only {free:.2f} GiB free at {folder} (need ≈{need:.2f} GiB for the next checkpoint): "
                    "training stopped before writing a broken checkpoint; the last complete one is intact — "
                    "free space on Drive (empty its trash), then run 02_train again"
                )
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if metrics and "eval_loss" in metrics:
            self.last_eval[state.global_step] = float(metrics["eval_loss"])

    def on_save(self, args, state, control, **kw):
        self.finalize(Path(args.output_dir) / f"checkpoint-{state.global_step}", state)
        return control

    def finalize(self, ckpt: Path, state) -> None:
        """Write the manifest of a just-saved checkpoint, then prune older ones."""
        if not ckpt.exists():
            return
        extra: dict[str, Any] = {"global_step": state.global_step, "max_steps": state.max_steps}
        sps = self._seconds_per_step(state)
        if sps:
            extra["seconds_per_step"] = sps
        if state.global_step in self.last_eval:
            extra["eval_loss"] = self.last_eval[state.global_step]
        write_manifest(ckpt, self.identity, extra)
        self.last_checkpoint_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        self.last_save = time.monotonic()
        folder = ckpt.parent
        prune_checkpoints(folder, self.keep, _best_checkpoint(folder), drive=self.drive)
