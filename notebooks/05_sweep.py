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
# # 05 · Sweep: which settings train best?
# Trains several short trials on a slice of the data, one per combination of settings, compares
# them in a table and two plots, and writes the winner's settings as a config for the full run in
# 02_train. After a disconnect, **run all cells again**: finished trials are skipped and the
# interrupted one continues from its checkpoint.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qlora-lab/qlora-lab/blob/main/notebooks/05_sweep.ipynb)
#
# Sections: [Setup](#Setup) · [Knobs](#Knobs) · [Plan](#Plan) · [Sweep](#Sweep) · [Compare](#Compare) · [Best](#Best)

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
# ## Knobs
# The search space maps `train.*` / `lora.*` keys (the same names as in the config) to the values
# to try. Short trials on a slice of the data are enough to rank settings; the winner then trains
# fully in 02_train. `lora.lora_alpha` stays fixed unless you sweep it, so the LoRA scale alpha/r
# changes with the rank.

# %%
RUN_NAME = ""  # @param {type:"string"} empty: the run set up in 00_setup; or the name of another run on Drive
METHOD = "grid"  # @param ["grid", "random"] grid: every combination; random: TRIALS draws from the space
SPACE = {  # settings to try: a list of values (grid or random), or {min, max, log} ranges (random only)
    "train.learning_rate": [2e-4, 1e-3],  # 2e-4 suits 1B–8B models; the tiny demo model learns faster at 1e-3
    "lora.r": [8, 32],  # adapter rank: capacity of the update
}
TRIALS = 4  # @param {type:"integer"} random search only: how many settings to draw
ROWS = 1000  # @param {type:"integer"} training rows per trial: a sample ranks settings at a fraction of the cost
STEPS_PER_TRIAL = 40  # @param {type:"integer"} optimizer steps per trial: the budget every trial gets
VAL_ROWS = 64  # @param {type:"integer"} validation rows for each trial's loss and generated answers
SELECT_BY = "eval_loss"  # @param ["eval_loss", "price_mae", "number_mae", "exact_match", "tool_call_match", "regex_match"] what "best" means
RETRY_FAILED = False  # @param {type:"boolean"} True: run trials that failed before (e.g. out of memory) again

run = lab.start(RUN_NAME, create=False)
path, why = lab.training_path()
print(f"Training path: {why}")

# %% [markdown]
# ## Plan
# Every trial gets its own run folder under `sweep/`. A trial is found again by its settings, so
# adding a value to the space keeps the trials already done.

# %%
sweep = lab.plan_sweep(run, {
    "sweep.method": METHOD,
    "sweep.space": SPACE,
    "sweep.trials": TRIALS,
    "sweep.rows": ROWS,
    "sweep.max_steps": STEPS_PER_TRIAL,
    "sweep.val_rows": VAL_ROWS,
    "sweep.select_by": SELECT_BY,
})
lab.show_table(lab.plan_table(sweep), title="Trials")

# %% [markdown]
# ## Sweep
# The long cell: each trial trains exactly as 02_train does (with the same live view of its loss,
# speed and time left), then answers the validation sample. A trial that fails (out of memory, any
# error) is recorded and the sweep goes on.

# %%
results = lab.run_sweep(sweep, path, retry_failed=RETRY_FAILED)

# %% [markdown]
# ## Compare
# Same budget, same data, same seed: the differences come from the settings. Rank 1 is best by
# `SELECT_BY`, in the direction 03_evaluate reports it (lower for losses and `*_mae`, higher for
# matches): each trial's task metric is the one 03 picks for these answers (`lab_utils.metrics`).

# %%
lab.show_table(results, title=f"{len(results)} trials, {STEPS_PER_TRIAL} steps each")

# %%
for plot in lab.plot_sweep(sweep):
    lab.show_image(plot)

# %% [markdown]
# The table and the curves read the tracker's own rows, so they agree with its dashboard, where the
# trials sit in one group (`<run>-sweep`) beside the run itself.

# %%
OPEN_DASHBOARD = False  # True: start trackio's dashboard (a local web server) and show it below
lab.dashboard(run, launch=OPEN_DASHBOARD)

# %% [markdown]
# ## Best
# The winner's settings in a full config: the run's own, with the best values and a new run name.
# Train it fully by pointing `LAB_CONFIG` at it for 01_data and 02_train, or copy the values into
# 00_setup's knobs.

# %%
best_config = lab.write_best_config(sweep)
print(best_config.read_text())
