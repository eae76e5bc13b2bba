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
# # 02 · Train: QLoRA that survives a disconnect
# Trains LoRA adapters on the 4-bit base model. Checkpoints go to Drive; when Colab disconnects,
# reconnect and **run all cells again**: training continues from the newest complete checkpoint.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qlora-lab/qlora-lab/blob/main/notebooks/02_train.ipynb)
#
# Sections: [Setup](#Setup) · [Load](#Load) · [Configure](#Configure) · [Train](#Train) · [Result](#Result)

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

# %%
RUN_NAME = ""  # @param {type:"string"} empty: the run set up in 00_setup; or the name of another run on Drive
RESTART = False  # @param {type:"boolean"} True: move this run's checkpoints aside and train from scratch
RESUME_FROM = None  # a checkpoint folder name to resume from instead of the newest, e.g. "checkpoint-100"

run = lab.start(RUN_NAME, restart=RESTART, create=False)
path, why = lab.training_path()
print(f"Training path: {why}")

# %% [markdown]
# ## Load
# The processed data from 01_data, then the base model in 4 bits (NF4 with double quantization)
# with fresh LoRA adapters on every projection layer.

# %%
tokenizer = lab.load_tokenizer(run.cfg)
dataset = lab.load_prepared(run, tokenizer)
settings = lab.train_settings(run)
model, tokenizer = lab.load_for_training(
    run.cfg, path,
    gradient_checkpointing=bool(settings.sft.get("gradient_checkpointing")),
    attn_implementation=settings.attn_implementation,
)
model.print_trainable_parameters()

# %% [markdown]
# ## Configure
# Every setting with its value and the reason for it. Hardware-dependent values (batch geometry,
# precision, optimizer) were chosen for this machine unless the config set them.

# %%
lab.show_table(lab.settings_table(run, settings, len(dataset["train"])), title="Training settings")
for reason in settings.reasons:
    print("·", reason)

# %% [markdown]
# The memory estimate for these settings, before anything is allocated: if it is close to the
# GPU's size, lower `model.max_length` or the micro-batch. An out-of-memory error during training
# halves the micro-batch (same effective batch) and continues from the last checkpoint.

# %%
lab.show_table(lab.memory_table(settings), title="Estimated peak memory")

# %% [markdown]
# The trainer, and beside it the checkpoint callback: it saves every `checkpoint.save_every_minutes`
# and marks each complete checkpoint with a manifest, which is what a re-run resumes from.

# %%
trainer, callback = lab.build_trainer(run, model, tokenizer, dataset, settings)
plan = lab.plan_resume(run, trainer, callback, RESUME_FROM)

# %% [markdown]
# ## Train
# The long cell. Stopping it (■) saves a checkpoint first; a disconnect loses at most
# `checkpoint.save_every_minutes` of work. While it runs, its output updates in place: training and
# validation loss, learning rate, tokens per second, step of total and time left, with the loss curve.
# After a disconnect the curve starts with the steps trained before it (from the checkpoint).

# %%
result = lab.train(run, trainer, callback, plan, settings)

# %% [markdown]
# ## Result
# The final adapter is saved beside the checkpoints; the loss curve shows how training went.

# %%
lab.save_adapter(run, trainer, plan)
print(f"{result.steps} steps; this session trained for {result.seconds / 60:.1f} min")
lab.show_image(lab.plot_training(run))

# %% [markdown]
# ## Track
# Every logged step also went to the experiment tracker named by `train.report_to` (trackio by default:
# no account, its database sits in this run's `tracking/` folder on Drive, so it survives the VM; a
# resumed run continues the same tracked run). The dashboard compares this run with the others and with
# sweep trials. W&B is used only with `train.report_to: wandb` and a `WANDB_API_KEY` in Colab's secrets.

# %%
OPEN_DASHBOARD = False  # True: start trackio's dashboard (a local web server) and show it below
lab.dashboard(run, launch=OPEN_DASHBOARD)
