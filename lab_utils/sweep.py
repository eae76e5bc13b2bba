"""Hyperparameter sweeps: short trials over a search space, each its own run folder, resumable and compared.

The `sweep:` section names a search space (dotted `train.*` / `lora.*` keys → values to try, grid or
random), a training subset and a per-trial step budget. Every trial is trained by the same code as
02_train (`lab_utils.training`) in `<run>/sweep/trial-NNN-<settings>/`, a folder with the run
folder's layout (config.yaml, checkpoints/, adapter/, log_history.json, eval/metrics.json) plus
`trial.json`, its status. A trial is found again by its full settings, so a re-run skips finished
trials, resumes an unfinished one from its newest complete checkpoint, and growing the space keeps
the work already done. A trial that fails (out of memory, any error) is recorded and the sweep goes on.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics as mt  # one metric choice, scorer and direction, shared with 03_evaluate
from .config import DEFAULTS, _nearest, dump_yaml, get, validate
from .errors import LabError
from .files import write_json, write_text
from .metrics import lower_is_better  # noqa: F401 — sweep.lower_is_better is read by older callers
from .run import Run

__all__ = [
    "Trial",
    "Sweep",
    "plan_sweep",
    "plan_table",
    "run_sweep",
    "sweep_table",
    "best_trial",
    "plot_sweep",
    "write_best_config",
]

# Short names for trial folders and table columns; other keys keep their field name.
SHORT = {
    "learning_rate": "lr",
    "r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "weight_decay": "wd",
    "warmup_steps": "warmup",
    "lr_scheduler_type": "sched",
    "per_device_train_batch_size": "micro",
    "gradient_accumulation_steps": "accum",
    "target_modules": "targets",
    "neftune_noise_alpha": "neftune",
}
_TRIAL_DIR = re.compile(r"^trial-(\d{3,})-")
STATE = "trial.json"


@dataclass
class Trial(Run):
    """One trial: a run folder under the sweep's, reading the parent run's processed data."""

    parent_data: Path = Path()
    index: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    key: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.parent_data

    def state(self) -> dict[str, Any]:
        """Return the trial's trial.json ({} before it first ran)."""
        try:
            return json.loads((self.dir / STATE).read_text())
        except (OSError, ValueError):
            return {}


@dataclass
class Sweep:
    """A planned sweep: the parent run, its sweep folder, the sweep settings used and the trials."""

    run: Run
    dir: Path
    spec: dict[str, Any]
    trials: list[Trial]

    @property
    def keys(self) -> list[str]:
        return list(self.spec["space"])


def short_name(key: str) -> str:
    """Return the short label of a dotted key ('train.learning_rate' → 'lr')."""
    field_name = key.split(".", 1)[-1]
    return SHORT.get(field_name, field_name)


def format_value(value: Any) -> str:
    """Return a compact text for a setting (0.001 → '1e-3', 0.1 → '0.1', [a, b] → 'a+b')."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            mantissa, exp = f"{value:.2e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    return str(value)


def trial_slug(settings: dict[str, Any]) -> str:
    """Return the settings part of a trial folder name ('lr1e-3_r16')."""
    text = "_".join(f"{short_name(k)}{format_value(v)}" for k, v in settings.items())
    return re.sub(r"[^A-Za-z0-9.+_-]", "-", text)[:60] or "base"


def _set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    cfg.setdefault(section, {})[key] = copy.deepcopy(value)


def _round(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}")


def combinations(spec: dict) -> list[dict[str, Any]]:
    """Return the settings of every trial: the grid's combinations in order, or `trials` seeded random draws."""
    space = spec["space"]
    keys = list(space)
    if spec["method"] == "grid":
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(space[k] for k in keys))]
    rng = random.Random(int(spec.get("seed", 42)))
    draws: list[dict[str, Any]] = []
    for _ in range(int(spec["trials"])):
        draw = {}
        for k in keys:
            values = space[k]
            if isinstance(values, dict):
                lo, hi = values["min"], values["max"]
                if values.get("log"):
                    v = math.exp(rng.uniform(math.log(lo), math.log(hi)))
                else:
                    v = rng.uniform(lo, hi)
                draw[k] = round(v) if isinstance(lo, int) and isinstance(hi, int) else _round(v)
            else:
                draw[k] = rng.choice(values)
        if draw not in draws:
            draws.append(draw)
    return draws


def _resolve_spec(run: Run, form: dict | None) -> dict[str, Any]:
    spec = {**DEFAULTS["sweep"], **copy.deepcopy(run.cfg.get("sweep", {}))}
    if form and os.environ.get("LAB_CONFIG"):
        print("LAB_CONFIG is set: the sweep comes from its sweep: section; the knobs above are not used.")
    elif form:
        for key, value in form.items():
            name = key.removeprefix("sweep.")
            if name not in DEFAULTS["sweep"]:
                raise LabError(f"unknown sweep setting {key!r}{_nearest(name, list(DEFAULTS['sweep']))}")
            spec[name] = copy.deepcopy(value)
    check = copy.deepcopy(run.cfg)
    check["sweep"] = spec
    validate(check)
    return spec


def _trial_config(run: Run, spec: dict, settings: dict[str, Any]) -> dict[str, Any]:
    """Return a trial's full config: the run's, with the trial's settings and the sweep's step budget."""
    cfg = copy.deepcopy(run.cfg)
    cfg.pop("sweep", None)
    for key, value in settings.items():
        _set_dotted(cfg, key, value)
    t = cfg["train"]
    steps = int(spec["max_steps"])
    half = max(1, math.ceil(steps / 2))  # a checkpoint at least halfway, so a disconnect costs half a trial
    saved = t.get("save_steps", 50)
    t["max_steps"] = steps
    t["save_steps"] = int(min(saved, half)) if isinstance(saved, (int, float)) and saved >= 1 else half
    t["eval_steps"] = t["save_steps"]
    t["logging_steps"] = max(1, steps // 20)
    t["save_total_limit"] = 1  # a finished trial needs only its adapter; this keeps Drive use small
    return validate(cfg)


def _fingerprint(run: Run) -> str | None:
    return run.data_report(required=True).get("fingerprint")


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def _existing(sweep_dir: Path) -> tuple[dict[str, Path], set[int]]:
    """Return ({trial key: folder} of earlier trials, every trial index already used)."""
    found: dict[str, Path] = {}
    used: set[int] = set()
    if not sweep_dir.exists():
        return found, used
    for p in sorted(sweep_dir.iterdir()):
        m = _TRIAL_DIR.match(p.name)
        if not (m and p.is_dir()):
            continue
        used.add(int(m.group(1)))
        try:
            state = json.loads((p / STATE).read_text())
        except (OSError, ValueError):
            continue
        if "key" in state:
            found.setdefault(_canonical(state["key"]), p)
    return found, used


def plan_sweep(run: Run, form: dict | None = None) -> Sweep:
    """Return the Sweep for this run: its settings (config, or the notebook's knobs) and every trial's folder.

    form: the notebook's knobs as 'sweep.<key>' → value; ignored when LAB_CONFIG is set.
    """
    spec = _resolve_spec(run, form)
    fingerprint = _fingerprint(run)
    sweep_dir = run.dir / "sweep"
    found, used = _existing(sweep_dir)
    next_index = max(used, default=0) + 1
    trials: list[Trial] = []
    seen: set[str] = set()
    for settings in combinations(spec):
        cfg = _trial_config(run, spec, settings)
        settings = {k: get(cfg, k) for k in settings}  # as validated: '2e-4' from YAML becomes 0.0002
        key = {
            "model": cfg["model"],
            "data": cfg["data"],
            "data_fingerprint": fingerprint,
            "lora": cfg["lora"],
            "train": cfg["train"],
            "eval": cfg.get("eval", {}),
            "rows": spec["rows"],
            "val_rows": spec["val_rows"],
            "seed": spec["seed"],
        }
        canon = _canonical(key)
        if canon in seen:
            continue
        seen.add(canon)
        folder = found.get(canon)
        if folder is None:
            folder = sweep_dir / f"trial-{next_index:03d}-{trial_slug(settings)}"
            next_index += 1
        index = int(_TRIAL_DIR.match(folder.name).group(1))
        cfg["run_name"] = f"{run.name[:58]}-t{index:03d}"
        trials.append(Trial(folder.name, folder, cfg, run.data_dir, index, settings, key))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(spec, sweep_dir / "sweep.yaml")
    rows = "all" if spec["rows"] is None else spec["rows"]
    print(
        f"Sweep: {spec['method']} search over {', '.join(spec['space'])}: {len(trials)} trials × "
        f"{spec['max_steps']} steps on {rows} training rows → {run.display(sweep_dir)}"
    )
    others = len(used) - len({t.index for t in trials} & used)
    if others > 0:
        print(f"{others} earlier trial folder(s) with other settings are not in this plan (left untouched).")
    return Sweep(run, sweep_dir, spec, trials)


def _status(trial: Trial) -> str:
    from .checkpoints import scan_checkpoints

    state = trial.state()
    if state.get("status") == "done":
        return "done"
    if state.get("status") == "failed":
        return f"failed: {state.get('error', '?')}"
    complete, _ = scan_checkpoints(trial.checkpoints_dir)
    return f"resumes at {complete[-1][1].name}" if complete else "to run"


def plan_table(sweep: Sweep) -> list[dict[str, Any]]:
    """Return rows (trial, each swept setting, status) describing what run_sweep will do."""
    return [
        {
            "trial": t.name,
            **{short_name(k): format_value(v) for k, v in t.settings.items()},
            "status": _status(t),
        }
        for t in sweep.trials
    ]


def _write_state(trial: Trial, **state: Any) -> None:
    write_json(trial.dir / STATE, state, indent=1, default=str)


def _subset(dataset, spec: dict):
    """Return a DatasetDict of the sweep's training subset and validation sample (the same on every re-run)."""
    from datasets import DatasetDict

    train = dataset["train"]
    rows = spec["rows"]
    if rows and int(rows) < len(train):
        train = train.shuffle(seed=int(spec["seed"])).select(range(int(rows)))
    val = dataset["validation"] if "validation" in dataset else None
    if val is None or len(val) == 0:
        raise LabError(
            "the sweep compares trials on validation rows, but the processed data has none — "
            "set data.val_fraction (e.g. 0.05) and run 01_data again"
        )
    val = val.select(range(min(int(spec["val_rows"]), len(val))))
    return DatasetDict({"train": train, "validation": val})


def _measure(trial: Trial, model, tokenizer, val, path: str, train=None) -> dict[str, Any]:
    """Return the trial's validation loss and task metric (greedy answers on the validation sample) and the
    constant guess's (from the trial's training rows), saved to eval/."""
    from . import evaluation as ev

    if path == "unsloth":
        from unsloth import FastLanguageModel  # type: ignore[import-not-found]

        FastLanguageModel.for_inference(model)
    model.eval()
    loss = ev.assistant_loss(model, val, pad_id=tokenizer.pad_token_id)
    prompts, refs = zip(*[ev.prompt_and_reference(m) for m in val["messages"]], strict=True)
    kind = mt.metric_kind(trial.cfg, list(refs))  # the same choice as 03_evaluate
    preds = ev.generate(
        model, tokenizer, list(prompts), int(trial.cfg.get("eval", {}).get("max_new_tokens", 16))
    )
    metrics = {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        **mt.task_metrics(preds, list(refs), kind, trial.cfg.get("eval", {}).get("metric_pattern")),
    }
    pattern = trial.cfg.get("eval", {}).get("metric_pattern")
    seed = int(trial.cfg.get("data", {}).get("seed", 42))
    guess = mt.baseline_scores(ev.train_references(train, seed), list(refs), kind, pattern, {"tuned": preds})
    if guess is not None:
        keys = mt.primary_keys([k for k in metrics if k not in ("eval_loss",)])
        metrics["baseline"] = {"answer": guess["answer"], **{k: guess[k] for k in keys if k in guess},
                               "beats": {k: mt.beats_baseline(k, metrics[k], guess[k], guess["margin"]["tuned"][k])
                                         for k in keys if k in guess}}
    out = trial.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "generations.jsonl", "".join(
        json.dumps({"prompt": p[-1]["content"], "reference": r, "tuned": g}) + "\n"
        for p, r, g in zip(prompts, refs, preds, strict=True)
    ))
    write_json(out / "metrics.json", {**metrics, "metric": kind, "rows": len(val)}, indent=2)
    return metrics


def _last_train_loss(trial: Trial) -> float | None:
    from .tracking import history

    hist = history(trial)  # what the tracker's dashboard shows for this trial
    losses = [h["loss"] for h in hist if "loss" in h]
    return float(losses[-1]) if losses else None


def _train_and_measure(trial: Trial, data, path: str) -> dict[str, Any]:
    """Train one trial exactly as 02_train does (resuming from its checkpoint), then measure it."""
    from .model import load_for_training
    from .training import build_trainer, plan_resume, save_adapter, train, train_settings

    t0 = time.monotonic()
    settings = train_settings(trial)
    model, tokenizer = load_for_training(
        trial.cfg,
        path,
        gradient_checkpointing=bool(settings.sft.get("gradient_checkpointing")),
        attn_implementation=settings.attn_implementation,
    )
    trainer, callback = build_trainer(trial, model, tokenizer, data, settings)
    plan = plan_resume(trial, trainer, callback)
    result = train(trial, trainer, callback, plan, settings)
    save_adapter(trial, trainer, plan)
    metrics = _measure(trial, model, tokenizer, data["validation"], path, data.get("train"))
    earlier = plan.step * (plan.seconds_per_step or 0.0)  # training done in sessions before this one
    return {
        "metrics": metrics,
        "train_loss": _last_train_loss(trial),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "seconds": earlier + time.monotonic() - t0,
    }


def _error_line(exc: BaseException) -> str:
    from .defaults import is_oom

    text = (str(exc).strip().splitlines() or [""])[0][:200]
    if is_oom(exc):
        return f"out of memory ({type(exc).__name__}: {text[:120]}) — lower lora.r, model.max_length or the batch"
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, LabError) else text


def _free_memory() -> None:
    from .hardware import free_memory

    free_memory()


def _run_trial(trial: Trial, data, path: str) -> None:
    """Train and measure one trial, recording in trial.json that it finished, or failed and why."""
    trial.dir.mkdir(parents=True, exist_ok=True)
    base = {"name": trial.name, "index": trial.index, "settings": trial.settings, "key": trial.key}
    _write_state(trial, **base, status="running")
    dump_yaml(trial.cfg, trial.config_path)
    t0 = time.monotonic()
    try:
        out = _train_and_measure(trial, data, path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # any failure is the trial's result, never the sweep's end
        error = _error_line(exc)
        _write_state(trial, **base, status="failed", error=error, seconds=time.monotonic() - t0)
        print(f"✗ {trial.name} failed: {error} — recorded; the sweep goes on")
        return
    _write_state(trial, **base, status="done", **out)
    m = out["metrics"]
    extra = ", ".join(f"{k} {v:.4g}" for k, v in m.items()
                      if k not in ("eval_loss", "perplexity") and isinstance(v, (int, float)))
    guess = m.get("baseline") or {}
    extra += "".join(f" (constant guess {guess[k]:.4g}: {'beaten' if won else 'not beaten'})"
                     for k, won in guess.get("beats", {}).items())
    print(
        f"✓ {trial.name}: validation loss {m['eval_loss']:.4f}{', ' + extra if extra else ''} "
        f"({out['seconds'] / 60:.1f} min)"
    )


def run_sweep(sweep: Sweep, path: str | None = None, *, retry_failed: bool = False) -> list[dict[str, Any]]:
    """Run every trial not yet finished (resuming an interrupted one); return the comparison table rows.

    path: "unsloth" or "plain" (default: lab_utils.training_path()); retry_failed: run failed trials again.
    """
    from .data import load_prepared
    from .environment import training_path
    from .model import load_tokenizer

    path = path or training_path()[0]
    data = _subset(load_prepared(sweep.run, load_tokenizer(sweep.run.cfg)), sweep.spec)
    n = len(sweep.trials)
    for i, trial in enumerate(sweep.trials, 1):
        state = trial.state()
        head = f"[{i}/{n}] {trial.name}"
        if state.get("status") == "done":
            print(f"{head}: finished earlier — skipped")
            continue
        if state.get("status") == "failed" and not retry_failed:
            print(
                f"{head}: failed earlier ({state.get('error')}) — skipped; set RETRY_FAILED = True to try it again"
            )
            continue
        settings = ", ".join(f"{k} = {format_value(v)}" for k, v in trial.settings.items())
        print(f"\n{head}: {settings}", flush=True)
        _run_trial(trial, data, path)
        _free_memory()
    rows = sweep_table(sweep)
    out = sweep.dir / "results.json"
    write_json(out, rows, indent=1, default=str)
    print(f"\nSaved comparison → {sweep.run.display(out)}")
    return rows


def _score(trial: Trial, metric: str) -> float | None:
    state = trial.state()
    if state.get("status") != "done":
        return None
    value = state.get("metrics", {}).get(metric)
    if not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def best_trial(sweep: Sweep) -> Trial | None:
    """Return the finished trial with the best sweep.select_by metric (None when no trial finished)."""
    metric = sweep.spec["select_by"]
    done = [t for t in sweep.trials if t.state().get("status") == "done"]
    if done and all(metric not in t.state().get("metrics", {}) for t in done):
        names = sorted(done[0].state().get("metrics", {}))
        raise LabError(f"sweep.select_by {metric!r} is not a trial metric — use one of {names}")
    scored = [(s, t) for t in done if (s := _score(t, metric)) is not None]
    if not scored:
        return None
    pick = min if mt.lower_is_better(metric) else max
    return pick(scored, key=lambda x: x[0])[1]


def sweep_table(sweep: Sweep) -> list[dict[str, Any]]:
    """Return one row per trial: settings, status, final train loss, validation loss, task metric, minutes, rank."""
    metric = sweep.spec["select_by"]
    scores = {t.name: s for t in sweep.trials if (s := _score(t, metric)) is not None}
    order = sorted(scores, key=lambda n: scores[n], reverse=not mt.lower_is_better(metric))
    task_keys: list[str] = []
    for t in sweep.trials:
        for k in t.state().get("metrics", {}):
            if k not in ("eval_loss", "perplexity", "baseline") and k not in task_keys:
                task_keys.append(k)
    rows = []
    for t in sweep.trials:
        state = t.state()
        m = state.get("metrics", {})
        row: dict[str, Any] = {"trial": t.name}
        row.update({short_name(k): format_value(v) for k, v in t.settings.items()})
        status = state.get("status", "not run")
        row["status"] = f"failed: {state.get('error')}" if status == "failed" else status
        row["train loss"] = state.get("train_loss")
        row["val loss"] = m.get("eval_loss")
        row.update({k: m.get(k) for k in task_keys})
        guess = m.get("baseline") or {}
        for k, beats in guess.get("beats", {}).items():  # the training split's median / most frequent answer
            row[f"{k} constant guess"] = guess.get(k)
            row["beats the guess?"] = "yes" if beats else "no"
        row["minutes"] = round(state["seconds"] / 60, 1) if "seconds" in state else None
        row["rank"] = order.index(t.name) + 1 if t.name in order else None
        rows.append({k: ("" if v is None else v) for k, v in row.items()})
    return rows


def _history(trial: Trial) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    from .tracking import history

    hist = history(trial)  # the tracker's rows, so the overlaid curves match its dashboard
    train = [(h["step"], h["loss"]) for h in hist if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h and "step" in h]
    return train, val


def plot_sweep(sweep: Sweep) -> list[Path]:
    """Save two PNGs in the sweep folder — every trial's loss curves overlaid, and validation loss
    against each swept value — and return their paths (none before a trial has trained)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(t, *_history(t)) for t in sweep.trials]
    curves = [c for c in curves if c[1]]
    if not curves:
        print("No trial has trained yet — run the sweep first.")
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(7, 3.8))
    colors = plt.get_cmap("tab10")
    for i, (t, train, val) in enumerate(curves):
        label = f"{t.index:03d} " + " ".join(
            f"{short_name(k)}={format_value(v)}" for k, v in t.settings.items()
        )
        ax.plot(*zip(*train, strict=True), color=colors(i % 10), label=label)
        if val:
            ax.plot(*zip(*val, strict=True), "o--", color=colors(i % 10), alpha=0.6, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("Sweep: training loss (lines), validation loss (dots)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(sweep.dir / "loss_curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    done = [(t, s) for t in sweep.trials if (s := _score(t, "eval_loss")) is not None]
    if done:
        keys = sweep.keys
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
        best = min(done, key=lambda x: x[1])[0]
        for ax, key in zip(axes[0], keys, strict=True):
            values = [t.settings[key] for t, _ in done]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if numeric:
                xs = values
                if min(values) > 0 and max(values) / min(values) >= 4:  # rates and ranks vary by factors
                    ax.set_xscale("log")
                ticks = sorted(set(values))
                if len(ticks) <= 6:
                    ax.set_xticks(ticks, [format_value(v) for v in ticks])
                    ax.minorticks_off()
            else:
                labels = list(dict.fromkeys(format_value(v) for v in values))
                xs = [labels.index(format_value(v)) for v in values]
                ax.set_xticks(range(len(labels)), labels)
            for x, (t, s) in zip(xs, done, strict=True):
                ax.scatter(
                    [x], [s], color="#ee6677" if t is best else "#4477aa", zorder=4 if t is best else 3
                )
            for x, (t, s) in zip(xs, done, strict=True):
                ax.annotate(f"{t.index:03d}", (x, s), textcoords="offset points", xytext=(4, 3), fontsize=7)
            ax.set_xlabel(key)
            ax.margins(x=0.15, y=0.1)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("validation loss")
        fig.suptitle("Validation loss against each swept setting (lower is better; best in red)")
        fig.tight_layout()
        paths.append(sweep.dir / "val_loss_by_setting.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write_best_config(sweep: Sweep) -> Path:
    """Write the best trial's settings as a full run config (sweep/best_config.yaml) for 02_train; return its path."""
    import yaml

    best = best_trial(sweep)
    if best is None:
        raise LabError(
            "no trial finished, so there is no best setting — see the table's errors, fix them and run the sweep again"
        )
    run = sweep.run
    cfg = copy.deepcopy(run.cfg)
    cfg.pop("sweep", None)
    for key, value in best.settings.items():
        _set_dotted(cfg, key, value)
    cfg["run_name"] = re.sub(r"[^A-Za-z0-9._-]", "-", f"{run.name[:40]}-{trial_slug(best.settings)}")[:64]
    validate(cfg)
    metric = sweep.spec["select_by"]
    path = sweep.dir / "best_config.yaml"
    header = (
        f"# Best of {len(sweep.trials)} sweep trials of run {run.name!r} by {metric}: {best.name} "
        f"({metric} {_score(best, metric):.4g} after {sweep.spec['max_steps']} steps).\n"
        f"# Train it fully: LAB_CONFIG={path} for 01_data and 02_train (then 03, 04).\n"
    )
    write_text(path, header + yaml.safe_dump(cfg, sort_keys=False))
    changes = ", ".join(
        f"{k} {format_value(get(run.cfg, k))} → {format_value(v)}"
        for k, v in best.settings.items()
        if get(run.cfg, k) != v
    )
    print(
        f"Best trial: {best.name} ({metric} {_score(best, metric):.4g}); "
        f"{changes or 'the run config already has these settings'}"
    )
    print(f"Saved best config → {run.display(path)}  (run_name {cfg['run_name']!r}; use it as LAB_CONFIG)")
    from .run import adopt_settings

    adopt_settings(run, best.settings, f"Best settings ({best.name})")  # kept on Drive: 02_train after a reconnect
    return path
