"""Checkpoints that survive a disconnect: complete-only discovery, manifests, safe resume, Drive-aware pruning.

The Trainer saves and restores checkpoints itself; this module adds what it lacks:
- a manifest (file names, sizes and sha256 content hashes, plus the run's identity) written *after*
  every file of a checkpoint, so a checkpoint cut off mid-save is never taken for a complete one,
  and one damaged later (same size, other bytes; NaN weights) is never resumed;
- discovery by step number (not a lexical sort), naming every partial, damaged or duplicate
  folder in one line and leaving it untouched;
- a refusal to resume when the run's identity (model, LoRA shape, data, effective batch) changed;
- time-based saves, a free-space check before each save, and pruning that empties files before
  deleting them on Drive (Drive's trash would otherwise keep counting against the quota); pruning
  never deletes the newest checkpoint that verified;
- one trainer per run: a lock file with a heartbeat (Drive has no reliable file locks);
- checkpoint folders the Trainer would write into in place (leftovers past the resume point) are
  moved aside first.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .environment import free_gib, on_drive, pid_alive
from .errors import LabError
from .files import tmp_path, write_json

__all__ = [
    "MANIFEST",
    "REQUIRED_FILES",
    "write_manifest",
    "check_checkpoint",
    "verify_checkpoint",
    "file_digest",
    "tmp_path",
    "set_aside",
    "RunLock",
    "check_checkpoints_folder",
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


HASH = "sha256"  # measured (bench/checkpoint_hash.py): faster than blake2b with OpenSSL's SHA extensions
_CHUNK = 1 << 20


def _is_tmp(name: str) -> bool:
    return name.endswith(".tmp") or ".tmp-" in name


def file_digest(path: Path, algo: str = HASH) -> str:
    """Return the hex digest of a file, read in 1 MiB chunks (streaming: memory stays flat)."""
    h = hashlib.new(algo)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_manifest(ckpt: Path, identity: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ckpt/lab_manifest.json listing every file, its size and sha256 (written last, atomically); return its path."""
    paths = [p for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST and not _is_tmp(p.name)]
    files = {str(p.relative_to(ckpt)): p.stat().st_size for p in paths}
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise LabError(f"checkpoint {ckpt.name} is missing {missing} right after saving — disk full? Check free space")
    digests = {str(p.relative_to(ckpt)): file_digest(p) for p in paths}
    body = {"files": files, HASH: digests, "identity": identity, "written": time.time(), **(extra or {})}
    return write_json(ckpt / MANIFEST, body, fsync=True, indent=1, sort_keys=True)


def check_checkpoint(ckpt: Path) -> str | None:
    """Return None if ckpt is complete (manifest present, every file there with its size), else the reason."""
    man = ckpt / MANIFEST
    if not man.exists():
        return "no manifest (cut off while saving?)"
    try:
        body = json.loads(man.read_text())
        files = body["files"]
        if not isinstance(files, dict):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "manifest unreadable"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"manifest lacks {name}"
    for name, size in files.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} missing"
        actual = p.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, manifest says {size}"
    return None


def _first_line(e: BaseException, n: int = 120) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:n]}" if text else type(e).__name__


def adapter_problem(path: Path) -> str | None:
    """Return None if the adapter safetensors file loads and every weight is finite, else what is wrong."""
    try:
        import torch
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return f"{path.name} holds NaN/inf weights ({key}): training diverged before this save"
    except Exception as e:  # SafetensorError, a damaged header, an unreadable file: all mean "do not resume"
        return f"{path.name} does not load ({_first_line(e)})"
    return None


def verify_checkpoint(ckpt: Path) -> str | None:
    """Return None if ckpt is complete, its files hash to what the manifest recorded and its adapter is finite, else why."""
    reason = check_checkpoint(ckpt)
    if reason:
        return reason
    digests = read_manifest(ckpt).get(HASH)
    if isinstance(digests, dict):  # manifests written before content hashes carry sizes only
        for name, want in digests.items():
            try:
                got = file_digest(ckpt / name)
            except OSError as e:
                return f"{name} cannot be read ({e.strerror or e})"
            if got != want:
                return f"{name} is not what was saved ({HASH} differs: damaged on disk or by a sync)"
    return adapter_problem(ckpt / "adapter_model.safetensors")


def read_manifest(ckpt: Path) -> dict:
    """Return the manifest of a checkpoint ({} when unreadable)."""
    try:
        body = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


def check_checkpoints_folder(folder: Path) -> None:
    """LabError when the run's checkpoints folder is a file (the Trainer could not write there)."""
    if folder.exists() and not folder.is_dir():
        raise LabError(
            f"{folder} is a file, not a folder — the run keeps its checkpoints there: move or rename that file "
            f"(e.g. to {folder.name}.old), then run 02_train again"
        )


def _checkpoint_dirs(folder: Path) -> list[tuple[int, Path]]:
    """Return (step, folder) for every folder named checkpoint-N under folder, sorted by step."""
    check_checkpoints_folder(folder)
    if not folder.exists():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found, key=lambda x: x[0])


def scan_checkpoints(folder: Path) -> tuple[list[tuple[int, Path]], list[str]]:
    """Return (complete checkpoints sorted by step, one line per folder that is skipped and why)."""
    complete: list[tuple[int, Path]] = []
    skipped: list[str] = []
    named = _checkpoint_dirs(folder)
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_dir() and not _NAME.match(p.name) and p.name.startswith("checkpoint"):
                skipped.append(f"Skipping {p.name}: not a Trainer checkpoint name (a Drive sync duplicate?) — left untouched")
    for step, p in named:
        reason = check_checkpoint(p)
        if reason:
            skipped.append(f"Skipping {p.name}: incomplete — {reason}")
        else:
            complete.append((step, p))
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
    in_the_way: list[Path] = field(default_factory=list)  # checkpoint-N folders past `step`: training would write into them
    finished: bool = False  # the run reached its last step: nothing to train


def _check_identity(path: Path, identity: dict) -> None:
    changes = identity_changes(read_manifest(path).get("identity", {}), identity)
    if changes:
        listed = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changes.items())
        raise LabError(
            f"{path.name} was trained with other settings ({listed}) — resuming would mix two runs: "
            "use a new run_name, or restart explicitly (RESTART = True in 02_train)"
        )


def choose_resume(folder: Path, identity: dict, explicit: str | Path | None = None) -> ResumePlan:
    """Return the ResumePlan: explicit checkpoint > newest one that verifies > fresh start; refuse identity changes.

    Checkpoints are tried newest first; one whose content does not match its manifest, or whose
    adapter does not load or holds NaN, is named in one line and the previous one is tried.
    """
    complete, skipped = scan_checkpoints(folder)
    chosen: tuple[int, Path] | None = None
    if explicit:
        p = Path(explicit)
        if not p.is_absolute():
            p = folder / p
        reason = verify_checkpoint(p) if p.exists() else "does not exist"
        if reason:
            raise LabError(f"resume checkpoint {str(p)!r} cannot be used: {reason} — pick one of {[c.name for _, c in complete]}")
        m = _NAME.match(p.name)
        chosen = (int(m.group(1)) if m else 0, p)
        why = "explicit choice"
    else:
        for step, path in reversed(complete):
            _check_identity(path, identity)
            reason = verify_checkpoint(path)
            if reason is None:
                chosen = (step, path)
                break
            skipped.append(f"Skipping {path.name}: damaged — {reason}; using an earlier checkpoint")
        why = "newest checkpoint that verified"
    start_step = chosen[0] if chosen else 0
    in_the_way = [p for step, p in _checkpoint_dirs(folder) if step > start_step]
    if chosen is None:
        why = "no complete checkpoint" if skipped else "no checkpoint yet"
        return ResumePlan(None, 0, f"Starting fresh ({why}).", skipped, in_the_way=in_the_way)
    step, path = chosen
    _check_identity(path, identity)
    sps = read_manifest(path).get("seconds_per_step")
    return ResumePlan(path, step, f"({why})", skipped, sps if isinstance(sps, (int, float)) else None, in_the_way)


def set_aside(run_dir: Path, folders: list[Path]) -> list[Path]:
    """Move checkpoint folders training would overwrite in place to run_dir/set-aside/; return their new paths."""
    moved = []
    if not folders:
        return moved
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest_root = run_dir / "set-aside"
    dest_root.mkdir(exist_ok=True)
    for p in folders:
        dest = dest_root / f"{p.name}-{stamp}"
        n = 1
        while dest.exists():
            n += 1
            dest = dest_root / f"{p.name}-{stamp}-{n}"
        os.replace(p, dest)
        moved.append(dest)
    return moved


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


def prune_checkpoints(
    folder: Path, keep: int | None, best: Path | None = None, *, protect: Path | None = None, drive: bool | None = None
) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep` (never `best`, never `protect` — the newest that
    verified — never incomplete ones); return those deleted."""
    if not keep or keep <= 0:
        return []
    complete, _ = scan_checkpoints(folder)
    keepers = {p for _, p in complete[-keep:]} | {p for p in (best, protect) if p is not None}
    deleted = []
    for _, p in complete:
        if p not in keepers:
            delete_tree(p, drive=drive)
            deleted.append(p)
    return deleted


def _best_checkpoint(folder: Path) -> Path | None:
    complete, _ = scan_checkpoints(folder)
    scored = [(read_manifest(p).get("eval_loss"), p) for _, p in complete]
    scored = [(loss, p) for loss, p in scored if isinstance(loss, (int, float)) and math.isfinite(loss)]
    return min(scored, key=lambda x: x[0])[1] if scored else None


# ------------------------------------------------------------------------------- one trainer per run

LOCK = "trainer.lock"
HEARTBEAT_S = 30.0  # how often the holder rewrites its heartbeat
STALE_S = 6 * HEARTBEAT_S  # 3 min without a heartbeat: the holder is gone (Drive may sync a beat late, so not 1 min)


def _when(t: Any) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(t), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "at an unknown time"


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


class RunLock:
    """One trainer per run: run_dir/trainer.lock names the holder (host, pid, start) and carries a heartbeat.

    Drive has no reliable file locks, so the lock is a file rewritten every HEARTBEAT_S seconds by a
    thread; a lock whose process is gone (same host) or whose heartbeat is older than STALE_S is
    taken over with a line saying so. Released on a normal end, on an error and on the stop button.
    """

    def __init__(self, run_dir: Path, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = Path(run_dir) / LOCK
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.body = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                     "token": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """Return the lock file's content (None when there is none; {} when it is unreadable)."""
        try:
            body = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError):
            return {}
        return body if isinstance(body, dict) else {}

    def _who(self, held: dict) -> str:
        beat = held.get("heartbeat")
        age = _ago(max(time.time() - float(beat), 0)) if isinstance(beat, (int, float)) else "never"
        return (f"host {held.get('host', '?')}, pid {held.get('pid', '?')}, started {_when(held.get('started'))}, "
                f"last heartbeat {age}")

    def _write(self) -> None:
        write_json(self.path, {**self.body, "heartbeat": time.time()})

    def acquire(self) -> str | None:
        """Take the lock, or LabError naming the trainer that holds it; return a line when a stale lock was taken over."""
        held = self.holder()
        note = None
        if held is not None:
            mine = held.get("token") == self.body["token"] or (
                held.get("host") == self.body["host"] and held.get("pid") == self.body["pid"])
            beat = held.get("heartbeat")
            age = time.time() - float(beat) if isinstance(beat, (int, float)) else float("inf")
            gone = held.get("host") == self.body["host"] and not pid_alive(held.get("pid"))
            if not mine and not gone and age <= self.stale_s:
                raise LabError(
                    f"run folder {self.path.parent.name!r} is being trained by another process ({self._who(held)}) — "
                    "two trainers would overwrite each other's checkpoints: stop the other notebook's training cell "
                    f"(or close that tab); if that runtime is gone, run this again after {self.stale_s / 60:.0f} min "
                    "without its heartbeat and the lock is taken over"
                )
            if not mine:
                why = "its process has ended" if gone else (
                    "no heartbeat for " + (_ago(age).removesuffix(" ago") if age != float("inf") else "ever"))
                note = f"Taking over the training lock of a trainer that is gone ({self._who(held)}; {why})."
        try:
            self._write()
        except OSError as e:
            raise LabError(
                f"cannot write to the run folder {self.path.parent} ({e.strerror or e}) — it is read-only here: "
                "check that you can edit it (on Drive: your own folder, not a shared view), or use a new run_name"
            ) from None
        again = self.holder() or {}
        if again.get("token") != self.body["token"]:  # another trainer wrote at the same moment
            raise LabError(
                f"run folder {self.path.parent.name!r} was just locked by another trainer ({self._who(again)}) — "
                "stop one of them, then run 02_train again"
            )
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lab-lock-heartbeat", daemon=True)
        self._thread.start()
        return note

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self.holder() or {}).get("token") != self.body["token"]:
                    return  # taken over: stop claiming it
                self._write()
            except OSError:
                pass  # a Drive hiccup: the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if (self.holder() or {}).get("token") == self.body["token"]:
            self.path.unlink(missing_ok=True)


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
        self.verified: Path | None = None  # the newest checkpoint known good: resumed from, or written with finite weights

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
        problem = adapter_problem(ckpt / "adapter_model.safetensors")
        if problem is None:
            self.verified = ckpt
        else:
            print(f"⚠ {ckpt.name}: {problem}; pruning keeps {self.verified.name if self.verified else 'every older one'}")
        folder = ckpt.parent
        if problem is None or self.verified is not None:
            prune_checkpoints(folder, self.keep, _best_checkpoint(folder), protect=self.verified, drive=self.drive)
