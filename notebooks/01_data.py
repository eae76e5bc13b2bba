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
# # 01 · Data: validate, tokenize with masks, report
# Reads the run's data (ShareGPT, OpenAI messages, Alpaca, prompt/completion or plain text; from the
# hub or a JSON/JSONL/CSV/Parquet file or folder), checks every row, applies the model's chat template
# and marks which tokens the model learns from (the assistant's answers). Saves the result in the run
# folder with a report of every dropped row.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qlora-lab/qlora-lab/blob/main/notebooks/01_data.ipynb)
#
# Sections: [Setup](#Setup) · [Knobs](#Knobs) · [Prepare](#Prepare) · [Report](#Report) · [Lengths](#Lengths) · [Look](#Look)

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
# How rows are read and checked. The data itself (`DATA_PATH`) and `MAX_LENGTH` are set in 00_setup.
# Changing a knob here re-processes the data; once training has started, a change needs a new run.

# %%
RUN_NAME = ""  # @param {type:"string"} empty: the run set up in 00_setup; or the name of another run on Drive
DATA_FORMAT = "auto"  # @param {type:"string"} auto (guessed from the columns, printed) or sharegpt, messages, alpaca, prompt_completion, text
ON_TOO_LONG = "drop"  # @param {type:"string"} rows over MAX_LENGTH: "drop" them whole or "truncate" their ends (both counted)
SYSTEM_PROMPT = ""  # @param {type:"string"} added to rows that have no system turn; empty: none added
VAL_FRACTION = 0.05  # @param {type:"number"} share held out to measure the model, unless the data has a validation split
MAX_DROP_FRACTION = 0.5  # @param {type:"number"} stop when more than this share of rows is unusable: the data is likely misread
ROLE_MAP = {}  # extra role names → user/assistant/system, e.g. {"narrator": "system"}; human/gpt/bot/model are known

FORM = {
    "data.format": DATA_FORMAT,
    "data.on_too_long": ON_TOO_LONG,
    "data.system_prompt": SYSTEM_PROMPT or None,
    "data.val_fraction": VAL_FRACTION,
    "data.max_drop_fraction": MAX_DROP_FRACTION,
    "data.role_map": ROLE_MAP,
}
run = lab.start(RUN_NAME, form=FORM, create=False)

# %% [markdown]
# ## Prepare
# Only the tokenizer is loaded here, never the model's weights. Every row is checked; rows that cannot
# be trained on are dropped with a reason, never silently. A re-run with the same inputs reuses the
# saved result (and says so).

# %%
tokenizer = lab.load_tokenizer(run.cfg)
dataset = lab.prepare_data(run, tokenizer)

# %%
print(dataset)

# %% [markdown]
# ## Report
# What happened to every row, and a few dropped rows as examples (row numbers count from 1 in the
# source). The same report is saved as `data/data_report.json` in the run folder.

# %%
report = lab.read_data_report(run)
lab.show_table(lab.report_table(report), title=f"{report['rows_in']} rows in, {report['rows_kept']} kept")
if report["examples"]:
    lab.show_table(lab.report_examples(report), title="Examples of dropped rows")

# %% [markdown]
# ## Lengths
# Tokens per row with the chat template applied. Rows over `model.max_length` were dropped or cut;
# a `max_length` far above what rows need only costs memory.

# %%
lab.show_table(lab.lengths_table(report), title="Tokens per row")
if report["suggestion"]:
    print("Suggestion:", report["suggestion"])

# %%
lab.show_image(run.data_dir / "lengths.png")

# %% [markdown]
# ## Look
# One training row as the model sees it: only the ⟦marked⟧ tokens (the assistant's answer and the
# end-of-turn marker after it) carry loss.

# %%
lab.show_masked_example(dataset["train"][0], tokenizer)
