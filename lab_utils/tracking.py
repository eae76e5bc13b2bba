"""Experiment tracking: trackio (local, in the run folder on Drive) by default; tensorboard, W&B or none on request.

`train.report_to` names the trackers and is passed through to transformers. trackio writes its
database to `<run>/tracking/` (a sweep's trials write to their parent run's, grouped under the
sweep), so the history survives the VM. One project per lab (`qlora-lab`), one tracked run per run
name. A resumed run continues the same tracked run: on resume from checkpoint-N the rows after N
(logged before the disconnect, about to be redone) are removed and any row up to N that never
reached the database is filled in from the checkpoint's log history — every step once, no gap.
Nothing here touches the network unless the user asked for a Space (TRACKIO_SPACE_ID) or W&B.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from .errors import LabError

__all__ = ["PROJECT", "REPORT_TO", "check_report_to", "tracking_dir", "trainer_kwargs", "attach", "history",
           "dashboard", "dashboard_command", "cli"]

PROJECT = "qlora-lab"  # one trackio project for the whole lab
REPORT_TO = ("trackio", "tensorboard", "wandb", "none")
_SINGLE_VALUE = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")


def check_report_to(value: Any) -> list[str]:
    """Return train.report_to as a list of tracker names; LabError naming the valid ones otherwise."""
    from .config import _nearest

    names = [value] if isinstance(value, str) or value is None else list(value)
    names = ["none" if n is None else n for n in names]
    for name in names:
        if name not in REPORT_TO:
            raise LabError(
                f"train.report_to must be one of {', '.join(REPORT_TO)} (or a list of them), got {name!r}"
                f"{_nearest(str(name), list(REPORT_TO))}"
            )
    names = [n for n in names if n != "none"]
    return list(dict.fromkeys(names))


def tracking_dir(run) -> Path:
    """Return the folder that holds trackio's database: <run>/tracking, or the parent run's for a sweep trial."""
    parent = getattr(run, "parent_data", None)
    base = Path(parent).parent if parent else run.dir
    return base / "tracking"


def sweep_group(run) -> str | None:
    """Return the tracker group of a sweep trial ('<parent run>-sweep'), None for a plain run."""
    parent = getattr(run, "parent_data", None)
    return f"{Path(parent).parent.name}-sweep" if parent else None


def _wandb_ready(run) -> None:
    """LabError unless W&B can be used: WANDB_API_KEY from Colab's secrets or the environment, and the package."""
    from .environment import get_secret

    key = get_secret("WANDB_API_KEY")
    if not key:
        raise LabError(
            "train.report_to asks for wandb but no WANDB_API_KEY was found — add it in Colab's secrets "
            "(key icon, notebook access on) or the environment, or set train.report_to: trackio (no account needed)"
        )
    if importlib.util.find_spec("wandb") is None:
        raise LabError("train.report_to asks for wandb but the wandb package is not installed — pip install wandb")
    os.environ["WANDB_API_KEY"] = key  # a Colab secret reaches wandb only through the environment; never printed
    os.environ.setdefault("WANDB_PROJECT", PROJECT)
    os.environ["WANDB_NAME"] = run.name
    os.environ["WANDB_RUN_ID"] = run.name  # one W&B run per run name: a resumed run continues it
    os.environ["WANDB_RESUME"] = "allow"
    group = sweep_group(run)
    if group:
        os.environ["WANDB_RUN_GROUP"] = group
    else:
        os.environ.pop("WANDB_RUN_GROUP", None)


def _use_trackio_dir(folder: Path) -> None:
    """Point trackio at folder, also when an earlier run in this process imported it with another folder."""
    os.environ["TRACKIO_DIR"] = str(folder)
    os.environ.setdefault("TRACKIO_STORAGE_MODE", "sqlite")  # one writer; the lab reads the database directly
    from .environment import on_drive

    if on_drive(folder):  # WAL's shared-memory file is unsafe on a FUSE mount; a rollback journal is not
        os.environ.setdefault("TRACKIO_SQLITE_JOURNAL_MODE", "DELETE")
    if "trackio.utils" not in sys.modules:
        return
    derived = {"TRACKIO_DIR": folder, "MEDIA_DIR": folder / "media", "ARTIFACTS_DIR": folder / "artifacts"}
    for name, module in list(sys.modules.items()):
        if name == "trackio" or name.startswith("trackio."):
            for attr, value in derived.items():
                if isinstance(getattr(module, attr, None), Path):
                    setattr(module, attr, value)


def trainer_kwargs(run, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return SFTConfig keyword arguments with report_to resolved and each tracker pointed at the run folder."""
    names = check_report_to(kwargs.get("report_to", "none"))
    out = {**kwargs, "report_to": names or "none", "run_name": run.name}
    if "wandb" in names:
        _wandb_ready(run)
    if "tensorboard" in names:
        if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
            raise LabError("train.report_to asks for tensorboard but it is not installed — pip install tensorboard")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tracking_dir(run) / "tensorboard" / run.name)  # transformers 5
    if "trackio" in names:
        if importlib.util.find_spec("trackio") is None:
            raise LabError("train.report_to asks for trackio but it is not installed — pip install trackio==0.43.0, "
                           "or set train.report_to: none")
        folder = tracking_dir(run)
        folder.mkdir(parents=True, exist_ok=True)
        _use_trackio_dir(folder)
        out["project"] = PROJECT
    return out


def _rows(log_history: list[dict]) -> list[tuple[int, dict[str, float]]]:
    """Return (step, metrics) rows as the tracker stores them: train/loss, eval/loss, train/learning_rate..."""
    from transformers.integrations.integration_utils import rewrite_logs

    rows = []
    for entry in log_history:
        if "step" not in entry:
            continue
        logs = {k: v for k, v in entry.items() if k not in (*_SINGLE_VALUE, "step") and _is_number(v)}
        if set(logs) - {"epoch"}:  # the end-of-training summary leaves only the epoch: not a step's row
            rows.append((int(entry["step"]), rewrite_logs(logs)))
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(metrics: dict) -> str:
    """Return 'eval' for a row of evaluation metrics, 'train' otherwise (a step can carry one of each)."""
    return "eval" if any(k.startswith("eval/") for k in metrics) else "train"


def _db_path(folder: Path) -> Path:
    return folder / f"{PROJECT}.db"


def _read(folder: Path, name: str) -> list[tuple[int, int, dict]]:
    """Return (row id, step, metrics) of the tracked run `name` in step order ([] when there is none)."""
    db = _db_path(folder)
    if not db.exists():
        return []
    try:
        # not mode=ro: a WAL database may need its -shm file made; closed at once so none stays open on Drive
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            rows = conn.execute("SELECT id, step, metrics FROM metrics WHERE run_name = ? ORDER BY step, id", (name,))
            return [(i, int(s), json.loads(m)) for i, s, m in rows.fetchall()]
    except sqlite3.OperationalError as e:  # a database trackio created but never wrote to; anything else is real
        if "no such table" in str(e):
            return []
        raise
    except sqlite3.DatabaseError as e:  # cut off or overwritten (a disconnect mid-write, a Drive sync)
        raise LabError(f"the tracking database {db} is damaged ({e}) — run 02_train again: it sets the file "
                       "aside and starts a new one from the checkpoint's history") from None


def _set_aside_if_damaged(folder: Path) -> Path | None:
    """Move a damaged tracking database (and its -wal/-shm files) to set-aside/; return where it went (None if sound).

    Tracking must never stop training: the new database is filled from the checkpoint's log history.
    """
    db = _db_path(folder)
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            sound = conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):  # another process writes it: not damage
            raise
        sound = False
    except sqlite3.DatabaseError:
        sound = False
    if sound:
        return None
    from .checkpoints import set_aside

    sides = [db.with_name(db.name + suffix) for suffix in ("-wal", "-shm")]
    return set_aside(folder.parent, [db, *[p for p in sides if p.exists()]])[0]  # <run>/set-aside/, with checkpoints


def _delete_after(folder: Path, name: str, step: int) -> int:
    """Delete the tracked rows of run `name` after `step`; return how many went."""
    db = _db_path(folder)
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        n = conn.execute("DELETE FROM metrics WHERE run_name = ? AND step > ?", (name, step)).rowcount
        conn.commit()
    return n


def _keep_aside(folder: Path, project: str, name: str) -> str | None:
    """Rename an earlier tracked run `name` (a fresh start over it) to '<name>-before-<time>'; return the new name."""
    if not _read(folder, name):
        return None
    from trackio.sqlite_storage import SQLiteStorage

    new = f"{name}-before-{time.strftime('%Y%m%d-%H%M%S')}"
    SQLiteStorage.rename_run(project, name, new)
    return new


def _trackio_callback_class():
    """Return transformers' TrackioCallback made resumable: rows keyed by optimizer step, reconciled on resume."""
    from transformers.integrations import TrackioCallback

    class LabTrackioCallback(TrackioCallback):
        lab_owned = True

        def __init__(self, folder: Path, group: str | None):
            super().__init__()
            self.folder, self.group = folder, group

        def setup(self, args, state, model, **kwargs):
            if not state.is_world_process_zero:
                self._initialized = True
                return
            with contextlib.redirect_stdout(io.StringIO()):  # trackio's banner; the lab prints one line below
                self._trackio.init(
                    project=args.project, name=args.run_name, group=self.group, resume="allow", embed=False,
                    auto_log_cpu=False, space_id=args.trackio_space_id, private=args.hub_private_repo,
                )
            self._space_id = self._trackio.context_vars.current_space_id.get()
            self._trackio.config.update({k: v for k, v in args.to_dict().items() if _is_number(v) or
                                         isinstance(v, str)}, allow_val_change=True)
            self._initialized = True

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero:
                return
            name = args.run_name
            # finish whatever run this process still has open first (a stop or an out-of-memory back-off
            # left its rows queued), so the rows after the checkpoint are all in the database to drop
            if self._trackio.context_vars.current_run.get() is not None:
                with contextlib.redirect_stdout(io.StringIO()):
                    self._trackio.finish()
            damaged = _set_aside_if_damaged(self.folder)
            kept = _keep_aside(self.folder, args.project, name) if state.global_step == 0 else None
            removed = _delete_after(self.folder, name, state.global_step)
            have = {(s, _kind(m)) for _, s, m in _read(self.folder, name)}
            missing = [(s, m) for s, m in _rows(state.log_history) if (s, _kind(m)) not in have]
            self.setup(args, state, model)
            for step, metrics in missing:
                self._trackio.log({**metrics, "train/global_step": step}, step=step)
            note = f"; {removed} row(s) after step {state.global_step} dropped (redone now)" if removed else ""
            fill = f"; {len(missing)} row(s) filled in from the checkpoint" if missing and have else ""
            kept = f"; the earlier tracked run without a checkpoint is kept as {kept!r}" if kept else ""
            if damaged:
                print(f"⚠ the tracking database was damaged: kept as {damaged.parent.name}/{damaged.name}; a new one is filled "
                      f"with the {len(missing)} row(s) of the checkpoint's history")
            print(f"Tracking: trackio run {name!r} in {self.folder} (project {args.project}{note}{fill}{kept})")

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if not self._initialized:
                self.setup(args, state, model)
            if not state.is_world_process_zero:
                return
            rows = _rows([{**(logs or {}), "step": state.global_step}])
            for step, metrics in rows:
                self._trackio.log({**metrics, "train/global_step": step}, step=step)

        def on_save(self, args, state, control, **kwargs):
            # rows up to a checkpoint reach the database with it (a kill then loses only rows the resume redoes)
            run = self._trackio.context_vars.current_run.get() if self._initialized else None
            if run is not None and getattr(run, "_is_local", False):
                with contextlib.suppress(Exception), run._client_lock:
                    run._flush_queues_inline()

        def on_train_end(self, args, state, control, **kwargs):
            with contextlib.redirect_stdout(io.StringIO()):  # "Run finished. Uploading logs..." (it is local)
                super().on_train_end(args, state, control, **kwargs)

    return LabTrackioCallback


def attach(run, trainer) -> None:
    """Swap transformers' trackio callback for the resumable one; show the live view instead of its progress bar."""
    from transformers.integrations import TrackioCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    from .live import LiveView

    if any(type(cb) is TrackioCallback for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(TrackioCallback)
        trainer.add_callback(_trackio_callback_class()(tracking_dir(run), sweep_group(run)))
    view = LiveView(title=run.name)
    if view.mode != "off":  # the view shows step of total and time left: one display, not two
        for cb in (ProgressCallback, NotebookProgressCallback, PrinterCallback):
            trainer.remove_callback(cb)
    trainer.add_callback(view)


def history(run) -> list[dict[str, Any]]:
    """Return the run's logged history, one dict per log event with 'step' (trackio's rows, else log_history.json).

    Keys as in Trainer.log_history ('loss', 'eval_loss', 'learning_rate'...), so the sweep table, its plots
    and the tracker's dashboard show the same numbers.
    """
    tracked = _read(tracking_dir(run), run.name)
    if tracked:
        out = []
        for _, step, metrics in tracked:
            row: dict[str, Any] = {"step": step}
            for key, value in metrics.items():
                if key == "train/global_step" or not _is_number(value):
                    continue
                section, _, field = key.partition("/")
                row[f"eval_{field}" if section == "eval" else field] = value
            out.append(row)
        return out
    try:
        return [h for h in json.loads((run.dir / "log_history.json").read_text()) if "step" in h]
    except (OSError, ValueError):
        return []


def dashboard_command(run) -> str:
    """Return the shell command that opens the trackio dashboard on this run's data."""
    return f'TRACKIO_DIR="{tracking_dir(run)}" trackio show --project {PROJECT}'


def dashboard(run, launch: bool = False, block: bool = False) -> str:
    """Print how to open the dashboard of this run's tracked data; launch=True starts it (block: until Ctrl-C).

    Return the shell command that opens it."""
    folder = tracking_dir(run)
    cmd = dashboard_command(run)
    if not _db_path(folder).exists():
        print(f"No tracked data yet in {run.display(folder)} — train first (02_train, with train.report_to: trackio).")
        return cmd
    print(f"Tracked runs of project {PROJECT} in {run.display(folder)}.")
    print(f"Open the dashboard: {cmd}")
    print(f'  or in Python: import os; os.environ["TRACKIO_DIR"] = "{folder}"; import trackio; trackio.show(project="{PROJECT}")')
    if launch:
        from urllib.parse import urlparse

        from .environment import show_port_in_colab

        _use_trackio_dir(folder)
        import trackio

        # never trackio's public share tunnel (its default on Colab): the dashboard stays private to this VM,
        # and Colab shows it through its own kernel-port iframe
        with contextlib.redirect_stdout(io.StringIO()):  # its banner repeats the URL with a write token
            _, local_url, _, _ = trackio.show(project=PROJECT, share=False, open_browser=False, block_thread=False)
        if not show_port_in_colab(urlparse(local_url).port or 7860):
            print(f"Dashboard → {local_url}")
        if block:
            print("Press Ctrl-C to stop the dashboard.")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    return cmd


def cli(argv: list[str]) -> int:
    """`python -m lab_utils dashboard [RUN_NAME] [--launch]`: say how to open (or open) a run's dashboard."""
    from .errors import LabError
    from .run import start

    names = [a for a in argv if not a.startswith("-")]
    try:
        run = start(names[0] if names else None, quiet=True)
    except LabError as e:
        print(f"✗ {e}", file=sys.stderr)
        return 1
    dashboard(run, launch="--launch" in argv, block=True)
    return 0
