# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Evaluate: did it work?
# Measures the base model and the tuned adapter on the same held-out rows (loss, perplexity and the
# task's own metric), finds the best checkpoint, shows answers side by side, and lets you chat with
# the tuned model. Everything is saved to `eval/`; a re-run after a disconnect reuses finished parts.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qlora-lab/qlora-lab/blob/main/notebooks/03_evaluate.ipynb)
#
# Sections: [Setup](#Setup) · [Load](#Load) · [Evaluate](#Evaluate) · [Checkpoints](#Checkpoints) · [Answers](#Answers) · [Chat](#Chat)

# %% [markdown]
# ## Setup
# The same cell opens every notebook, so each one starts on its own after a disconnect. On Colab it
# installs the lab with its pinned libraries while keeping Colab's torch, torchvision and numpy exactly
# as they are (a constraints file of their installed versions) and, on a GPU, unsloth without the
# extras it would pull in; anywhere else it installs nothing.

# %%
# Setup: identical in every notebook (a test keeps it so). Safe to re-run.
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tempfile

REPO_URL = "https://github.com/qlora-lab/qlora-lab"  # the one place the repository is named
KEEP = ("torch", "torchvision", "torchaudio", "numpy")  # Colab's own builds: pinned as they are, never changed
UNSLOTH = ["unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "cut_cross_entropy"]  # GPU fast path, without its deps
UNSLOTH_NEEDS = ["psutil", "einops", "regex", "pydantic", "nest_asyncio"]  # what unsloth imports beyond the lab


def install_commands(gpu: bool, lab: str = f"qlora-lab @ git+{REPO_URL}") -> list[list[str]]:
    """Return this cell's pip commands: the VM's torch/numpy as constraints, unsloth with --no-deps."""
    pins = []
    for name in KEEP:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    with tempfile.NamedTemporaryFile("w", suffix="-keep.txt", delete=False) as keep:
        keep.write("\n".join(pins) + "\n")
    pip = [sys.executable, "-m", "pip", "install", "-q", "-c", keep.name]
    return [pip + [lab, *UNSLOTH_NEEDS], pip + ["--no-deps", *UNSLOTH]] if gpu else [pip + [lab]]


if "google.colab" in sys.modules and importlib.util.find_spec("lab_utils") is None:
    for command in install_commands(gpu=shutil.which("nvidia-smi") is not None):
        subprocess.run(command, check=True)

import lab_utils as lab

# %% [markdown]
# ## Load
# The run trained in 02_train. The task metric comes from the config's `eval.metric`: `auto` picks
# the price error for the embedded Pricer; `exact_match`, `number` or `regex` (with
# `eval.metric_pattern`) suit your own data.

# %%
RUN_NAME = ""  # @param {type:"string"} empty: the run set up in 00_setup; or the name of another run on Drive
EVAL_ROWS = 0  # @param {type:"integer"} validation rows scored (a fixed, seeded sample): more = steadier, slower; 0: the run's eval.rows (200)
CHAT_MAX_NEW_TOKENS = 64  # @param {type:"integer"} longest chat reply in tokens

run = lab.start(RUN_NAME, form={"eval.rows": EVAL_ROWS} if EVAL_ROWS else None, create=False)
print(f"Task metric: eval.metric = {run.cfg['eval']['metric']!r}; answers up to {run.cfg['eval']['max_new_tokens']} tokens")

# %% [markdown]
# ## Evaluate
# The base model is the same 4-bit model with its adapter switched off, so both see exactly the same
# tokens. Each kept checkpoint's adapter is loaded onto that same base to find the best one
# (`eval.checkpoints: none` skips them). The task metric fits the answers: a price or number error,
# tool calls, exact match for short closed answers (labels, names), and for free-form text the word
# overlap with the reference (token F1, ROUGE-L) — read the answers side by side below as well.
#
# Beating the base is not enough: a model can learn the answer's format and nothing else. So the
# task metric is also scored for a **constant guess** — always giving the training split's median
# answer (numbers, prices) or its most frequent one (labels) — and the verdict says "better than a
# constant guess by X" only when the tuned model wins by more than the noise of these rows
# (two standard errors), otherwise "no better than always answering …".

# %%
metrics = lab.evaluate_run(run)

# %%
lab.show_table(lab.metrics_table(metrics), title=f"Validation, {metrics['rows']} rows: constant guess, base, tuned")
print(lab.verdict(metrics))
print(lab.loss_note(run, metrics) or "")

# %%
lab.show_image(lab.plot_task_metric(run, metrics))

# %% [markdown]
# ## Checkpoints
# Validation loss at every kept checkpoint, over the training loss. 04_export ships the best one
# (starred) unless `export.adapter` is `"last"`.

# %%
lab.show_table(metrics["checkpoints"], title=f"Best checkpoint: {metrics['best_checkpoint']}")
lab.show_image(lab.plot_loss_curve(run, metrics))

# %% [markdown]
# ## Answers
# The same prompts, answered greedily by the base model and the tuned adapter. All of them are in
# `eval/generations.jsonl`.

# %%
lab.show_table(lab.generations_table(run), title="Same prompts, base vs tuned (greedy)")

# %% [markdown]
# ## Chat
# Talk to the tuned model: type, press Send, watch the reply stream in; Reset starts over. Your
# messages go through the same chat template as the training rows.

# %%
chat = lab.chat_widget(run, max_new_tokens=CHAT_MAX_NEW_TOKENS)
