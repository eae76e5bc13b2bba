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
# Reads the run's data (any of ShareGPT, OpenAI messages, Alpaca, prompt/completion or plain text),
# checks every row, applies the model's chat template and marks which tokens the model learns from
# (the assistant's answers). Saves the result in the run folder with a report of every dropped row.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qlora-lab/qlora-lab/blob/main/notebooks/01_data.ipynb)
#
# Sections: [Setup](#Setup) · [Load](#Load) · [Prepare](#Prepare) · [Look](#Look)

# %% [markdown]
# ## Setup
# The same cell opens every notebook, so each one starts on its own after a disconnect. On Colab it
# installs the lab with its pinned libraries (never torch: Colab's CUDA build stays) and, on a GPU,
# unsloth; anywhere else it installs nothing.

# %%
# Setup: identical in every notebook (a test keeps it so). Safe to re-run.
import importlib.util
import shutil
import subprocess
import sys

REPO_URL = "https://github.com/qlora-lab/qlora-lab"  # the one place the repository is named
if "google.colab" in sys.modules and importlib.util.find_spec("lab_utils") is None:
    packages = [f"qlora-lab @ git+{REPO_URL}"]
    if shutil.which("nvidia-smi"):
        packages.append("unsloth==2026.10.9")  # the GPU fast path
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *packages], check=True)

import lab_utils as lab

# %% [markdown]
# ## Load
# Only the tokenizer is needed here, never the model's weights.

# %%
RUN_NAME = "pricer-demo"  # @param {type:"string"} the run made in 00_setup

run = lab.start(RUN_NAME)
tokenizer = lab.load_tokenizer(run.cfg)

# %% [markdown]
# ## Prepare
# Rows that cannot be trained on are dropped with a reason, never silently. A re-run with the same
# inputs reuses the saved result.

# %%
dataset = lab.prepare_data(run, tokenizer)
print(dataset)

# %% [markdown]
# ## Look
# What happened to every row, how long the rows are, and one row as the model sees it: only the
# ⟦marked⟧ tokens carry loss.

# %%
import json

report = json.loads((run.data_dir / "data_report.json").read_text())
lab.show_table(lab.report_table(report), title=f"{report['rows_in']} rows in, {report['rows_kept']} kept")
lab.show_table([{"statistic": k, "value": v} for k, v in report["length_stats"].items()], title="Tokens per row")
if report.get("suggestion"):
    print("Suggestion:", report["suggestion"])

# %%
lab.show_image(run.data_dir / "lengths.png")

# %%
lab.show_masked_example(dataset["train"][0], tokenizer)
