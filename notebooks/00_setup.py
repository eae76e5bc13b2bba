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
# # 00 · Setup: environment and run config
# Checks the machine (GPU, memory, bf16, Drive space, which training path) and writes the run's
# `config.yaml` on Drive, which the other notebooks read.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qlora-lab/qlora-lab/blob/main/notebooks/00_setup.ipynb)
#
# Sections: [Setup](#Setup) · [Knobs](#Knobs) · [Environment](#Environment) · [Config](#Config)

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
# The few names you change. The defaults run the **embedded demo** (a tiny model and a price task,
# minutes even on a CPU); for a real fine-tune set `MODEL_NAME` to a hub model and `DATA_PATH` to
# your data. A new `RUN_NAME` starts a new run; the same name continues the old one. The other
# notebooks open the run named here (recorded on Drive), so they need no editing, after a disconnect too.

# %%
RUN_NAME = "pricer-demo"  # @param {type:"string"} folder of this run on Drive; 01–05 open it
MODEL_NAME = "embedded:tiny-llama"  # @param {type:"string"} e.g. "unsloth/Llama-3.2-1B-Instruct" on a T4
DATA_PATH = "embedded:pricer"  # @param {type:"string"} hub dataset id, or a .jsonl/.json/.csv/.parquet file
MAX_LENGTH = 128  # @param {type:"integer"} longest row in tokens; 01_data shows what your rows need
LORA_R = 32  # @param {type:"integer"} adapter rank: capacity of the update (16–64 usual)
LORA_ALPHA = 64  # @param {type:"integer"} adapter scale; 2 × rank is the common choice
LORA_DROPOUT = 0.1  # @param {type:"number"} dropout on adapter inputs, a little regularisation
LEARNING_RATE = 1e-3  # @param {type:"number"} 1e-3 suits the tiny demo model; use 2e-4 for a real 1B–8B model
NUM_EPOCHS = 1  # @param {type:"number"} passes over the data
MAX_STEPS = 200  # @param {type:"integer"} stop after this many updates (-1: run all epochs)
SAVE_EVERY_MINUTES = 20  # @param {type:"number"} a disconnect loses at most this much work

FORM = {
    "model.name": MODEL_NAME,
    "data.path": DATA_PATH,
    "model.max_length": MAX_LENGTH,
    "lora.r": LORA_R,
    "lora.lora_alpha": LORA_ALPHA,
    "lora.lora_dropout": LORA_DROPOUT,
    "train.learning_rate": LEARNING_RATE,
    "train.num_train_epochs": NUM_EPOCHS,
    "train.max_steps": MAX_STEPS,
    "checkpoint.save_every_minutes": SAVE_EVERY_MINUTES,
}

# %% [markdown]
# ## Environment
# Mount Drive (on Colab), pick the runs folder, and report what this machine offers. Training on a
# T4 uses fp16 (it has no bf16) and the unsloth fast path when it is installed.

# %%
run = lab.start(RUN_NAME, form=FORM)

# %%
lab.show_table(lab.environment_report(run.dir.parent), headers=["what", "value"], title="This machine")

# %% [markdown]
# ## Config
# The resolved config, saved once in the run folder. Re-running with changes that would mix two
# runs (model, LoRA shape, data) is refused once training has started; harmless ones are listed.

# %%
print(run.config_path.read_text())
