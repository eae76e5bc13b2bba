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
# Measures the base model and the tuned adapter on the same held-out rows: loss, perplexity and the
# task's own metric, plus side-by-side answers. Saves everything to `eval/`.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qlora-lab/qlora-lab/blob/main/notebooks/03_evaluate.ipynb)
#
# Sections: [Setup](#Setup) · [Load](#Load) · [Evaluate](#Evaluate) · [Compare](#Compare)

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

# %%
RUN_NAME = "pricer-demo"  # @param {type:"string"} the run trained in 02_train

run = lab.start(RUN_NAME)

# %% [markdown]
# ## Evaluate
# The base model is the same model with its adapter switched off, so both see exactly the same tokens.

# %%
metrics = lab.evaluate_run(run)

# %% [markdown]
# ## Compare

# %%
keys = [k for k in metrics["base"] if isinstance(metrics["base"][k], (int, float))]
lab.show_table(
    [{"metric": k, "base": metrics["base"][k], "tuned": metrics["tuned"][k]} for k in keys],
    title=f"Validation, {metrics['rows']} rows",
)

# %%
import json

rows = [json.loads(line) for line in (run.eval_dir / "generations.jsonl").read_text().splitlines()]
lab.show_table(rows[: run.cfg["eval"]["num_generations"]], headers=["prompt", "reference", "base", "tuned"],
               title="Same prompts, base vs tuned (greedy)")
print(f"Saved metrics → {run.display(run.eval_dir / 'metrics.json')}")
