"""Plots a person would rather look at than read: loss curves (PNG, shown inline in notebooks)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_training"]


def plot_training(run, out: Path | None = None) -> Path | None:
    """Save training and validation loss vs step from the run's log history as a PNG; return its path."""
    hist_path = run.dir / "log_history.json"
    if not hist_path.exists():
        print("No training log yet — run 02_train first.")
        return None
    hist = json.loads(hist_path.read_text())
    train = [(h["step"], h["loss"]) for h in hist if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h and "step" in h]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    if train:
        ax.plot(*zip(*train), label="training loss", color="#4477aa")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="#ee6677")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"{run.name}: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out or run.dir / "training_loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
