"""The run folder and its config: what every notebook does first, after a disconnect too.

`start()` mounts Drive (on Colab), finds the runs folder, resolves the config, and compares it
with the run's saved `config.yaml`: the first time it writes it; later, changes that would mix
two runs are refused with the changed keys named, harmless ones are applied and listed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .config import diff_configs, dump_yaml, load_yaml, resolve_config, validate
from .environment import lab_root, mount_drive
from .errors import LabError, install_handler

__all__ = ["Run", "start", "RUN_FORMAT"]

RUN_FORMAT = 1  # bump when the run folder's layout changes; older folders get a clear message

# Changes a re-run may make to a run that already has checkpoints; anything else would mix two runs.
HARMLESS = (
    "profile",
    "train.max_steps",
    "train.num_train_epochs",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "train.report_to",
    "train.per_device_train_batch_size",  # the effective batch is checked separately
    "train.gradient_accumulation_steps",
    "train.gradient_checkpointing",
    "train.fp16",
    "train.bf16",
    "train.dataloader_num_workers",
    "checkpoint.",
    "eval.",
    "export.",
    "sweep.",
)


def _is_harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


@dataclass
class Run:
    """A run: its name, folder and resolved config, with the contract's sub-folders."""

    name: str
    dir: Path
    cfg: dict[str, Any]

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"

    @property
    def eval_dir(self) -> Path:
        return self.dir / "eval"

    @property
    def export_dir(self) -> Path:
        return self.dir / "export"

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    def display(self, path: Path | None = None) -> str:
        """Return a short human path (MyDrive/... on Drive) for path or the run folder."""
        p = str(path or self.dir)
        return p.split("/content/drive/", 1)[-1] if p.startswith("/content/drive/") else p


def _check_format(run_dir: Path) -> None:
    meta = run_dir / "run.json"
    if not meta.exists():
        return
    try:
        fmt = json.loads(meta.read_text()).get("format", 0)
    except (OSError, ValueError):
        raise LabError(f"{meta} is damaged — restore it from Drive's version history or use a new run_name") from None
    if fmt > RUN_FORMAT:
        raise LabError(
            f"run folder {run_dir} was written by a newer qlora-lab (format {fmt} > {RUN_FORMAT}) — "
            "upgrade the package (re-run 00_setup's install cell) or use a new run_name"
        )
    if fmt < RUN_FORMAT:
        raise LabError(
            f"run folder {run_dir} comes from an older qlora-lab (format {fmt} < {RUN_FORMAT}) — "
            "use a new run_name, or install the version that wrote it"
        )


def _archive(run_dir: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = run_dir / f"previous-{stamp}"
    dest.mkdir()
    for name in ("config.yaml", "checkpoints", "adapter", "eval", "export", "log_history.json", "training_loss.png"):
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(dest / name))
    return dest


def start(run_name: str | None = None, form: dict | None = None, *, restart: bool = False, quiet: bool = False) -> Run:
    """Return the Run for this notebook: Drive mounted, runs folder ready, config resolved and checked.

    run_name: the notebook's RUN_NAME (LAB_RUN_NAME and LAB_CONFIG's run_name win over it).
    form: the notebook's form fields as dotted keys; None in notebooks that only read the run.
    restart: move an existing run's artifacts to previous-<time>/ and start it afresh.
    """
    install_handler()
    say = (lambda *a: None) if quiet else print
    mounted = mount_drive()
    root, why = lab_root(mounted)
    say(why)

    form = dict(form or {})
    if run_name:
        form.setdefault("run_name", run_name)
    # Which run? LAB_RUN_NAME > LAB_CONFIG's run_name > the notebook's RUN_NAME.
    wanted = resolve_config(form={"run_name": form.get("run_name")} if form.get("run_name") else None)
    if os.environ.get("LAB_CONFIG"):
        wanted = resolve_config()
    name = wanted["run_name"]
    run_dir = root / name
    saved_path = run_dir / "config.yaml"

    if saved_path.exists():
        _check_format(run_dir)
        try:
            saved = validate(load_yaml(saved_path))
        except LabError as e:
            raise LabError(f"the run's saved config is unusable: {e}") from None
        new = resolve_config(form=form, base=saved)
        new["run_name"] = name
        changes = diff_configs(saved, new)
        breaking = {k: v for k, v in changes.items() if not _is_harmless(k)}
        has_work = any((run_dir / n).exists() for n in ("checkpoints", "adapter"))
        if breaking and has_work and not restart:
            listed = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in breaking.items())
            raise LabError(
                f"run {name!r} already has training results made with other settings ({listed}) — "
                "set a new run_name to keep both, or restart this run explicitly (RESTART = True in 02_train)"
            )
        if restart and has_work:
            dest = _archive(run_dir)
            say(f"Restarting run {name!r}: earlier checkpoints and results moved → {dest}")
        for k, (a, b) in changes.items():
            say(f"Config change accepted: {k}: {a!r} → {b!r}")
        if changes or not saved_path.exists():
            dump_yaml(new, saved_path)
        cfg = new
        say(f"Run {name!r}: config → {saved_path}")
    else:
        cfg = resolve_config(form=form)
        cfg["run_name"] = name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(
            json.dumps({"format": RUN_FORMAT, "qlora_lab": __version__, "created": _dt.datetime.now().isoformat()})
        )
        dump_yaml(cfg, saved_path)
        say(f"Run {name!r}: new run, config written → {saved_path}")
    return Run(name=name, dir=run_dir, cfg=cfg)
