"""The run folder and its config: what every notebook does first, after a disconnect too.

`start()` mounts Drive (on Colab), finds the runs folder, resolves the config, and compares it
with the run's saved `config.yaml`: the first time it writes it; later, changes that would mix
two runs are refused with the changed keys named, harmless ones are applied and listed.

Only 00_setup creates a run (01–05 pass create=False), and it leaves a pointer in the runs folder
(`current_run.json`): 01–05, reopened on a fresh VM with RUN_NAME empty, open that run.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    check_run_name,
    check_with_libraries,
    diff_configs,
    dump_yaml,
    load_yaml,
    merge_defaults,
    resolve_config,
    validate,
)
from .environment import import_unsloth_first, lab_root
from .errors import LabError, install_handler
from .files import write_json

__all__ = ["Run", "start", "RUN_FORMAT", "POINTER", "adopt_settings"]

POINTER = "current_run.json"  # in the runs folder: the run 00_setup set up last
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

    @property
    def data_report_path(self) -> Path:
        return self.data_dir / "data_report.json"

    def data_report(self, required: bool = False) -> dict[str, Any] | None:
        """Return 01_data's data/data_report.json as a dict: None when absent (LabError if required), LabError when damaged."""
        path = self.data_report_path
        if not path.is_file():
            if required:
                raise LabError(f"no data report in {self.display(self.data_dir)} — run 01_data first")
            return None
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            report = None
        if not isinstance(report, dict):
            raise LabError(f"the data report {self.display(path)} is damaged — run 01_data again to make it anew")
        return report

    def display(self, path: Path | None = None) -> str:
        """Return a short human path (MyDrive/... on Drive) for path or the run folder."""
        p = str(path or self.dir)
        return p.split("/content/drive/", 1)[-1] if p.startswith("/content/drive/") else p


def _check_format(run_dir: Path) -> None:
    """LabError when the run folder was written by another version of the package (run.json's format)."""
    meta = run_dir / "run.json"
    if not meta.exists():
        if next(run_dir.glob("checkpoints/checkpoint-*/lab_manifest.json"), None) is not None:
            raise LabError(
                f"run folder {run_dir} has checkpoints made by qlora-lab but its run.json is gone — restore run.json "
                "from Drive's trash or version history (right-click → Manage versions), or use a new run_name; "
                "this folder is left as it is"
            )
        if (run_dir / "config.yaml").exists():
            raise LabError(
                f"run folder {run_dir} has a config.yaml but no run.json, so it was not made by this qlora-lab "
                "(or run.json was deleted) — use a new run_name; this folder is left as it is"
            )
        return
    try:
        body = json.loads(meta.read_text())
        fmt = body.get("format", 0)
        version = body.get("qlora_lab", "unknown")
    except (OSError, ValueError, AttributeError):
        raise LabError(
            f"{meta} is damaged — restore it from Drive's version history (right-click → Manage versions) "
            "or use a new run_name"
        ) from None
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise LabError(f"{meta} has format {fmt!r}, not a number — restore it from Drive's version history or use a new run_name")
    if fmt > RUN_FORMAT:
        raise LabError(
            f"run folder {run_dir} was written by a newer qlora-lab ({version}, run format {fmt} > {RUN_FORMAT}) — "
            "upgrade the package (re-run the setup cell after a fresh runtime) or use a new run_name"
        )
    if fmt < RUN_FORMAT:
        raise LabError(
            f"run folder {run_dir} comes from an older qlora-lab ({version}, run format {fmt} < {RUN_FORMAT}) — "
            f"use a new run_name (this folder is left as it is), or install qlora-lab {version} to finish it"
        )


def _load_saved(path: Path) -> dict:
    """Return the run's saved config, completed with today's defaults; LabError naming the fix when unusable."""
    try:
        return validate(merge_defaults(load_yaml(path)))
    except LabError as e:
        raise LabError(
            f"the run's saved config is unusable ({e}) — restore {path.name} from Drive's version history "
            "(right-click → Manage versions), or use a new run_name"
        ) from None


def _touched(changed: set[str] | None, *prefixes: str) -> bool:
    """Return True for a new run (changed is None) or when a changed key is or lies under one of prefixes."""
    if changed is None:
        return True
    return any(k == p or k.startswith(p + ".") for k in changed for p in prefixes)


def _check_data_path(spec: str) -> None:
    """LabError when data.path names a local file or folder that is missing, empty or of an unknown type."""
    from .data import LOCAL_TYPES
    from .embedded import is_embedded, resolve_data

    if is_embedded(spec):
        resolve_data(spec)
        return
    p = Path(spec).expanduser()
    types = "/".join(sorted(LOCAL_TYPES))
    if p.is_file():
        if p.suffix.lower() not in LOCAL_TYPES:
            raise LabError(f"data.path {spec!r} is a {p.suffix or 'suffix-less'} file — use a {types} file")
        if p.stat().st_size == 0:
            raise LabError(f"data.path {spec!r} is an empty file — check the file, or point data.path elsewhere")
        return
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in LOCAL_TYPES]
        if not files:
            raise LabError(f"data.path {spec!r} is a folder with no {types} file in it — point it at one")
        if all(f.stat().st_size == 0 for f in files):
            raise LabError(f"data.path {spec!r}: every data file in it is empty — check the folder")
        return
    local = spec.startswith(("/", ".", "~")) or p.suffix.lower() in LOCAL_TYPES or spec.count("/") > 1
    if local:
        hint = " (is Google Drive mounted, and is the file under MyDrive?)" if spec.startswith("/content/drive") else ""
        raise LabError(f"data.path {spec!r} does not exist{hint} — check the path (a hub dataset id looks like 'org/name')")
    from .environment import check_hub_repo

    check_hub_repo(spec, key="data.path", repo_type="dataset")


def _check_precision(cfg: dict) -> None:
    """LabError when train.fp16 / train.bf16 ask for something this machine cannot do."""
    t = cfg["train"]
    if not (t.get("fp16") is True or t.get("bf16") is True):
        return
    if t.get("fp16") is True and t.get("bf16") is True:
        raise LabError("train.fp16 and train.bf16 are both true — keep one, or remove both and let the lab choose")
    from .defaults import detect_hardware

    hw = detect_hardware()
    key = "train.fp16" if t.get("fp16") is True else "train.bf16"
    if hw.kind != "cuda":
        raise LabError(
            f"{key} needs a CUDA GPU, and this machine has none — remove it: the lab picks the precision for the hardware"
        )
    if key == "train.bf16" and not hw.bf16:
        raise LabError(
            f"train.bf16 needs a GPU with bfloat16 (L4, A100, H100); this {hw.name} has none — use fp16: true, "
            "or remove both and let the lab choose"
        )


def _preflight(cfg: dict, root: Path, changed: set[str] | None) -> None:
    """Check what writing this config commits the run to, before anything is written (changed None: a new run)."""
    from .environment import check_free_space, require_hardware
    from .model import check_model_source, check_target_modules, remote_code

    m = cfg["model"]
    remote_code(cfg)  # one warning line when it is on
    if _touched(changed, "profile") or os.environ.get("LAB_PROFILE"):
        require_hardware(os.environ.get("LAB_PROFILE") or cfg.get("profile", "auto"),
                         "LAB_PROFILE" if os.environ.get("LAB_PROFILE") else "profile")
    if _touched(changed, "data.path"):
        _check_data_path(cfg["data"]["path"])
    if _touched(changed, "model.name", "model.revision"):
        check_model_source(m["name"], revision=m.get("revision"))
    if m.get("tokenizer") and _touched(changed, "model.tokenizer"):
        check_model_source(
            m["tokenizer"], key="model.tokenizer", need=("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
        )
    if _touched(changed, "lora", "model.name"):
        check_target_modules(cfg)
    if _touched(changed, "train", "lora"):
        _check_precision(cfg)
        check_with_libraries(cfg)
    check_free_space(root, float(cfg["checkpoint"].get("min_free_gib", 0.5)))


def _archive(run_dir: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = run_dir / f"previous-{stamp}"
    dest.mkdir()
    for name in ("config.yaml", "checkpoints", "adapter", "eval", "export", "log_history.json", "training_loss.png"):
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(dest / name))
    return dest


def _runs_in(root: Path) -> list[str]:
    """Return the names of the runs in root (folders holding a config.yaml), sorted."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.yaml").is_file())


def _runs_listed(root: Path) -> str:
    names = _runs_in(root)
    return f"runs in {root}: {', '.join(names)}" if names else f"there is no run in {root} yet"


def write_pointer(root: Path, name: str) -> Path:
    """Record name as the run 00_setup set up (root/current_run.json, written atomically); return its path."""
    path = root / POINTER
    body = {"run_name": name, "set_up": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    return write_json(path, body)


def read_pointer(root: Path) -> tuple[str, str]:
    """Return (run name, one line naming it) from the runs folder's pointer; LabError when it is missing or damaged."""
    path = root / POINTER
    if not path.exists():
        raise LabError(
            f"no run has been set up in {root} yet — run 00_setup first (it writes the run's config), "
            "or set RUN_NAME to the run to open"
        )
    try:
        body = json.loads(path.read_text())
        name, when = str(body["run_name"]), str(body.get("set_up", "an unknown date"))
    except (OSError, ValueError, KeyError, TypeError):
        raise LabError(
            f"{path} is damaged — run 00_setup again (it rewrites it), or set RUN_NAME; {_runs_listed(root)}"
        ) from None
    check_run_name(name, str(path))  # a hand-edited pointer never leads outside the runs folder
    return name, f"Run {name}, set up in 00_setup on {when}"


def _has_results(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in ("checkpoints", "adapter"))


def adopt_settings(run: Run, settings: dict[str, Any], origin: str) -> bool:
    """Write dotted settings into the run's config.yaml on Drive (02_train then trains with them, after a reconnect too); return True when written.

    Allowed while the run has no training results; otherwise one line says how to train them (a new
    run_name), and nothing changes. With LAB_CONFIG set that file rules, so nothing is written either.
    """
    from .config import _set_dotted

    if os.environ.get("LAB_CONFIG"):
        print(f"LAB_CONFIG is set, so 02_train reads {os.environ['LAB_CONFIG']}: {origin} not written into run {run.name!r}")
        return False
    if _has_results(run.dir):
        print(
            f"✗ {origin} not applied: run {run.name!r} already has training results — to train them, set a new "
            "RUN_NAME with these values in 00_setup (or use the saved config as LAB_CONFIG)"
        )
        return False
    saved = _load_saved(run.config_path)
    new = copy.deepcopy(saved)
    for key, value in settings.items():
        _set_dotted(new, key, value)
    new = validate(new)
    changes = diff_configs(saved, new)
    if changes:
        dump_yaml(new, run.config_path)
        run.cfg = new
    listed = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changes.items()) or "no change"
    print(f"{origin} applied to run {run.name!r} ({listed}) → {run.display(run.config_path)}; 02_train trains with it")
    return True


def start(
    run_name: str | None = None,
    form: dict | None = None,
    *,
    restart: bool = False,
    quiet: bool = False,
    create: bool = True,
) -> Run:
    """Return the Run for this notebook: Drive mounted, runs folder ready, config resolved and checked.

    run_name: the notebook's RUN_NAME (LAB_RUN_NAME and LAB_CONFIG's run_name win over it); empty in
      01–05 (create=False) means the run set up in 00_setup (the runs folder's current_run.json).
    form: the notebook's form fields as dotted keys; None in notebooks that only read the run.
    create: True in 00_setup: a new run may be made, and the run is recorded as the one 01–05 open.
      01–05 pass False: a name with no run folder is refused with the runs there (LAB_CONFIG, a
      whole config, may still create one).
    restart: move an existing run's artifacts to previous-<time>/ and start it afresh.

    Every check (config values, runs folder, data and model paths, hardware, free space, changes
    to a run that has results) runs before the first byte is written: a refused start leaves the
    run folder exactly as it was.
    """
    install_handler()
    import_unsloth_first()  # before the config's schema check imports trl and peft
    say = (lambda *a: None) if quiet else print

    creating = create or bool(os.environ.get("LAB_CONFIG"))
    from_pointer = not (run_name or creating or os.environ.get("LAB_RUN_NAME"))
    form = dict(form or {})
    if run_name:
        form.setdefault("run_name", run_name)
    # The config as asked for, checked before Drive or the runs folder is touched.
    # Which run? LAB_RUN_NAME > LAB_CONFIG's run_name > the notebook's RUN_NAME > 00_setup's pointer.
    wanted = resolve_config(form=form)
    root, why = lab_root()
    say(why)
    if from_pointer:
        wanted["run_name"], line = read_pointer(root)
        say(line)
    name = wanted["run_name"]
    run_dir = root / name
    saved_path = run_dir / "config.yaml"
    has_work = _has_results(run_dir)

    if run_dir.exists():
        _check_format(run_dir)
    if saved_path.exists():
        saved = _load_saved(saved_path)
        new = resolve_config(form=form, base=saved)
        new["run_name"] = name
        changes = diff_configs(saved, new)
        breaking = {k: v for k, v in changes.items() if not _is_harmless(k)}
        if breaking and has_work and not restart:
            listed = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in breaking.items())
            raise LabError(
                f"run {name!r} already has training results made with other settings ({listed}) — "
                "set a new run_name to keep both, or restart this run explicitly (RESTART = True in 02_train "
                "moves the old results to previous-<time>/; nothing is deleted)"
            )
        _preflight(new, root, set(changes) if not (restart and has_work) else None)
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
        if has_work:
            raise LabError(
                f"run folder {run_dir} has training results but no config.yaml — restore config.yaml from Drive's "
                "version history (right-click → Manage versions), or use a new run_name; this folder is left as it is"
            )
        if not creating and from_pointer:
            raise LabError(
                f"run {name!r}, set up in 00_setup, is no longer in {root} ({_runs_listed(root)}) — run 00_setup "
                "again, or set RUN_NAME to one of those runs"
            )
        if not creating:
            raise LabError(
                f"there is no run {name!r} in {root} ({_runs_listed(root)}) — leave RUN_NAME empty for the run set "
                f"up in 00_setup, use one of those names, or set up {name!r} in 00_setup"
            )
        cfg = wanted
        cfg["run_name"] = name
        _preflight(cfg, root, None)
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = run_dir / "run.json"
        if not meta.exists():
            meta.write_text(
                json.dumps({"format": RUN_FORMAT, "qlora_lab": __version__, "created": _dt.datetime.now().isoformat()})
            )
        dump_yaml(cfg, saved_path)
        say(f"Run {name!r}: new run, config written → {saved_path}")
    if create:  # 00_setup: the run 01–05 open when their RUN_NAME is empty, after a reconnect too
        write_pointer(root, name)
    return Run(name=name, dir=run_dir, cfg=cfg)
