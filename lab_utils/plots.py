"""Plots a person would rather look at than read: loss curves and base-vs-tuned bars (PNG, shown inline)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["plot_training", "plot_loss_curve", "plot_task_metric"]

COLORS = {"train": "#4477aa", "val": "#ee6677", "ckpt": "#228833", "best": "#ccbb44",
          "base": "#bbbbbb", "tuned": "#4477aa", "best_bar": "#228833", "baseline": "#eeeeee"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _history(run) -> list[dict] | None:
    path = run.dir / "log_history.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def plot_training(
    run, out: Path | None = None, checkpoints: list[dict] | None = None, best: str | None = None
) -> Path | None:
    """Save training and validation loss vs step (plus measured checkpoints, best starred) as a PNG; return its path.

    checkpoints: [{"name", "step", "loss"}] as in eval/metrics.json; best: the best one's name.
    """
    hist = _history(run) or []
    if not hist and not checkpoints:
        print("No training log yet — run 02_train first.")
        return None
    train = [(h["step"], h["loss"]) for h in hist if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h and "step" in h]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", color=COLORS["train"])
    if val:
        ax.plot(*zip(*val, strict=True), "o-", ms=3, label="validation loss (during training)", color=COLORS["val"], alpha=0.7)
    if checkpoints:
        pts = sorted((c["step"], c["loss"]) for c in checkpoints)
        ax.plot(*zip(*pts, strict=True), "s", ms=6, label="validation loss (kept checkpoints)", color=COLORS["ckpt"])
        for c in checkpoints:
            if c["name"] == best:
                ax.plot(c["step"], c["loss"], "*", ms=18, color=COLORS["best"], markeredgecolor="black",
                        label=f"best: {best}", zorder=5)
                ax.annotate(f"{c['loss']:.3f}", (c["step"], c["loss"]), textcoords="offset points",
                            xytext=(0, 10), ha="center", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"{run.name}: loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out or run.dir / "training_loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_loss_curve(run, metrics: dict[str, Any]) -> Path | None:
    """Save eval/loss_curve.png: training loss, validation loss at each kept checkpoint, the best starred."""
    return plot_training(
        run, run.eval_dir / "loss_curve.png", metrics.get("checkpoints") or None, metrics.get("best_checkpoint")
    )


def plot_task_metric(run, metrics: dict[str, Any]) -> Path:
    """Save eval/task_metric.png: one bar panel per task metric (and the loss): constant guess, base, tuned (, best)."""
    from .metrics import lower_is_better

    keys = [k for k, v in metrics["base"].items() if k != "perplexity" and isinstance(v, (int, float))]
    keys = [k for k in keys if k != "loss"] + ["loss"]
    names = {"best": "best ckpt", "baseline": "constant\nguess"}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys) + 0.6, 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        # the constant guess (always the training median / most frequent answer) has no loss: no bar there
        cols = [c for c in ("baseline", "base", "tuned", "best")
                if c in metrics and isinstance(metrics[c].get(key), (int, float))]
        values = [metrics[c][key] for c in cols]
        labels = [names.get(c, c) for c in cols]
        colors = [COLORS["best_bar" if c == "best" else c] for c in cols]
        bars = ax.bar(labels, values, color=colors, edgecolor=["#777777" if c == "baseline" else "none" for c in cols],
                      hatch=["//" if c == "baseline" else "" for c in cols])
        for bar, v in zip(bars, values, strict=True):
            if isinstance(v, (int, float)) and not math.isnan(v):
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8)
        ax.set_title(f"{key}\n({'lower' if lower_is_better(key) else 'higher'} is better)", fontsize=9)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    answer = str((metrics.get("baseline") or {}).get("answer", "")).replace("$", r"\$")  # "$" starts mathtext
    guess = f" vs always answering '{answer}'" if metrics.get("baseline") else ""
    fig.suptitle(f"{run.name}: base vs tuned{guess} on {metrics.get('rows', '?')} validation rows", fontsize=10)
    fig.tight_layout()
    out = run.eval_dir / "task_metric.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
