"""The live view of a training run: loss, validation loss, learning rate, tokens/s, step of total, time left.

In Jupyter or Colab one output updates in place (a small table and a loss plot, through an IPython
display handle: no widgets, so Colab's widget manager does not matter). In a script, or when
LAB_LIVE=lines (the test suite sets it for nbval), each log event is one plain line. Nothing waits
for input. On a resumed run the curve starts with the steps before the disconnect: the Trainer
has loaded them from the checkpoint's trainer_state.json into state.log_history.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

__all__ = ["LiveView", "Status", "live_mode", "status", "format_line", "render_html", "expected_time_line"]

MODES = ("notebook", "lines", "off")


def live_mode() -> str:
    """Return how the live view shows itself: LAB_LIVE if set, else notebook in a kernel and lines elsewhere."""
    from .display import in_notebook

    wanted = os.environ.get("LAB_LIVE", "auto").strip().lower()
    if wanted in MODES:
        return wanted
    return "notebook" if in_notebook() else "lines"


@dataclass
class Status:
    """Where a run stands at one log event."""

    step: int
    total: int
    loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    seconds_left: float | None = None


def _last(history: list[dict], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return float(entry[key])
    return None


def status(history: list[dict], step: int, total: int, *, elapsed: float, steps_done: int,
           tokens: float | None) -> Status:
    """Return the Status after `steps_done` steps in `elapsed` seconds of this session (tokens: trained in it)."""
    per_step = elapsed / steps_done if steps_done > 0 and elapsed > 0 else None
    return Status(
        step=step,
        total=total,
        loss=_last(history, "loss"),
        val_loss=_last(history, "eval_loss"),
        learning_rate=_last(history, "learning_rate"),
        tokens_per_second=tokens / elapsed if tokens and elapsed > 0 else None,
        seconds_left=max(total - step, 0) * per_step if per_step is not None else None,
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _cells(s: Status) -> dict[str, str]:
    """Return the status as labelled text cells (the table's columns, the line's parts)."""
    def num(v: float | None, fmt: str) -> str:
        return "…" if v is None else format(v, fmt)

    return {
        "step": f"{s.step}/{s.total}",
        "loss": num(s.loss, ".4f"),
        "val loss": num(s.val_loss, ".4f"),
        "lr": num(s.learning_rate, ".2e"),
        "tokens/s": num(s.tokens_per_second, ",.0f"),
        "time left": _duration(s.seconds_left),
    }


def format_line(s: Status) -> str:
    """Return the one-line form: 'step 12/40 · loss 1.2340 · val loss … · lr 2.00e-04 · tokens/s 5,210 · time left 0:42'."""
    return " · ".join(f"{k} {v}" if k != "step" else f"step {v}" for k, v in _cells(s).items())


def expected_time_line(seconds_per_step: float, steps_left: float, accumulation: int = 1) -> str:
    """Return the one line said once early in training: the measured time per step and the time the rest will take."""
    end = time.strftime("%H:%M", time.localtime(time.time() + seconds_per_step * steps_left))
    timed = "steps 3–4 timed" if accumulation == 1 else f"micro-batches 3–4 timed × accumulation {accumulation}"
    return (f"Expected time: {seconds_per_step:.1f} s per step ({timed}) → about "
            f"{_duration(seconds_per_step * steps_left)} for the {round(steps_left)} steps left (done near {end})")


def _plot_png(history: list[dict], title: str, resumed_at: int = 0) -> bytes | None:
    """Return a small PNG of training and validation loss against step (learning rate on a second axis)."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    lr = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h and "step" in h]
    if not train and not val:
        return None
    from .plots import COLORS, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 2.8))
    if train:
        ax.plot(*zip(*train, strict=True), color=COLORS["train"], label="training loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", ms=3, color=COLORS["val"], label="validation loss")
    if resumed_at:
        ax.axvline(resumed_at, color=COLORS["ckpt"], lw=1, ls="--", label=f"resumed at {resumed_at}")
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax2 = ax.twinx()
        handles += ax2.plot(*zip(*lr, strict=True), color="#999999", lw=1, ls=":", label="learning rate")
        labels.append("learning rate")
        ax2.set_ylabel("learning rate", fontsize=8)
        ax2.tick_params(labelsize=7)
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(handles, labels, fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def render_html(s: Status, history: list[dict], title: str, note: str = "", resumed_at: int = 0) -> str:
    """Return the notebook view: a one-row status table and the loss plot, as one HTML block."""
    from html import escape

    cells = _cells(s)
    head = "".join(f"<th style='text-align:left;padding:0 8px'>{escape(k)}</th>" for k in cells)
    body = "".join(f"<td style='text-align:left;padding:0 8px'>{escape(v)}</td>" for v in cells.values())
    png = _plot_png(history, title, resumed_at)
    img = f"<br><img src='data:image/png;base64,{base64.b64encode(png).decode()}'>" if png else ""
    caption = f"<div style='font-size:90%'>{escape(note)}</div>" if note else ""
    return f"<div><table><thead><tr>{head}</tr></thead><tbody><tr>{body}</tr></tbody></table>{caption}{img}</div>"


class LiveView(TrainerCallback):
    """TrainerCallback that shows the run as it trains: in place in a notebook, one line per log in a script."""

    lab_owned = True  # rebuilt by build_trainer after an out-of-memory back-off, never copied

    def __init__(self, title: str = "", mode: str | None = None, min_interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.title, self.mode, self.min_interval, self.clock = title, mode or live_mode(), min_interval, clock
        self.history: list[dict[str, Any]] = []
        self.handle = None
        self.total = self.start_step = 0
        self.t0 = self.last_shown = 0.0
        self.session_from = 0
        self.tokens_before = 0.0
        self.timed_from: float | None = None
        self.note = ""

    def _status(self, step: int) -> Status:
        tokens = _last(self.history[self.session_from:], "num_tokens")
        if tokens is not None:  # num_tokens counts the whole run (a resumed run too): this session's share
            tokens -= self.tokens_before
        return status(self.history, step, self.total, elapsed=self.clock() - self.t0,
                      steps_done=step - self.start_step, tokens=tokens)

    def _show(self, step: int, force: bool = False) -> None:
        now = self.clock()
        if self.mode == "notebook" and self.handle is not None and (force or now - self.last_shown >= self.min_interval):
            from IPython.display import HTML

            self.handle.update(HTML(render_html(self._status(step), self.history, self.title, self.note,
                                                self.start_step)))
            self.last_shown = now

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.mode == "off":
            return
        self.total, self.start_step, self.t0 = int(state.max_steps), int(state.global_step), self.clock()
        self.history = [dict(h) for h in state.log_history if "step" in h]  # from the checkpoint when resumed
        self.session_from = len(self.history)
        self.timed_from, self.micro = 0.0, 0
        self.tokens_before = _last(self.history, "num_tokens") or 0.0
        earlier = sum("loss" in h for h in self.history)
        self.note = (f"continued from step {self.start_step}: the curve includes {earlier} logged steps from before"
                     if self.start_step else "")
        if self.mode == "lines":
            print(f"Live: {self.total - self.start_step} steps to go ({self.note or 'fresh start'}); "
                  f"one line every {args.logging_steps} step(s)", flush=True)
            return
        from IPython.display import HTML, display

        first = render_html(self._status(self.start_step), self.history, self.title, self.note, self.start_step)
        self.handle = display(HTML(first), display_id=True)
        self.last_shown = self.clock()

    def _micro_step(self, args, state) -> None:
        """Time micro-batches 3–4 of this session (the first two carry start-up costs); then say the expected time once."""
        if not state.is_world_process_zero or self.mode == "off" or self.timed_from is None:
            return
        self.micro += 1
        if self.micro == 2:
            self.timed_from = self.clock()
        elif self.micro == 4:
            accumulation = max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
            per_step = (self.clock() - self.timed_from) / 2 * accumulation
            steps_left = max(self.total - self.start_step - 4 / accumulation, 0.0)
            print(expected_time_line(per_step, steps_left, accumulation), flush=True)
            self.timed_from = None

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_step(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        self._micro_step(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.mode == "off" or not logs:
            return
        self.history.append({**logs, "step": state.global_step})
        if self.mode == "lines":
            if "loss" in logs or "eval_loss" in logs:
                print(format_line(self._status(state.global_step)), flush=True)
            return
        self._show(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.mode == "notebook":
            self._show(state.global_step, force=True)
