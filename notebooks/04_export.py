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
# # 04 · Export: adapter, merged model, GGUF, model card
# Produces everything you take away — the LoRA adapter, the adapter merged into a 16-bit model,
# GGUF files for llama.cpp / Ollama / LM Studio, and a model card — each checked by reading it back.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/qlora-lab/qlora-lab/blob/main/notebooks/04_export.ipynb)
#
# Sections: [Setup](#Setup) · [Choose](#Choose) · [Merge](#Merge) · [GGUF](#GGUF) · [Card and push](#Card-and-push)

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
# ## Choose
# What to export. A merged 1B model needs ~2.5 GB of Drive and each GGUF another 1.3–2.5 GB;
# space is checked before anything is written.

# %%
RUN_NAME = ""  # @param {type:"string"} empty: the run set up in 00_setup; or the name of another run on Drive
EXPORT_MERGED = True  # @param {type:"boolean"} adapter merged into a 16-bit model (needed for GGUF)
GGUF_TYPES = ["f16", "q8_0"]  # f16: exact; q8_0: half the size, near-exact; q4_k_m: needs llama.cpp's quantize
PUSH_REPO = ""  # @param {type:"string"} e.g. "your-name/pricer-lora"; empty: no upload (token from Colab secrets)

run = lab.start(
    RUN_NAME,
    form={"export.merged": EXPORT_MERGED, "export.gguf": GGUF_TYPES, "export.push_repo": PUSH_REPO or None},
    create=False,
)
exported = lab.export_adapter(run)

# %% [markdown]
# ## Merge
# The base is loaded in 16 bits (not the 4-bit training weights) and the adapter folded into it;
# its logits are compared with base + adapter on random tokens.

# %%
merged = lab.export_merged(run) if run.cfg["export"]["merged"] or run.cfg["export"]["gguf"] else None

# %% [markdown]
# ## GGUF
# Converted with llama.cpp's own `convert_hf_to_gguf.py`, then read back with an independent
# reader (transformers' GGUF loader) and compared with the merged model.

# %%
gguf_rows = lab.export_gguf(run, merged) if merged and run.cfg["export"]["gguf"] else []
lab.show_table(gguf_rows, title="GGUF files, read back and compared with the merged model")

# %% [markdown]
# ## Card and push
# The model card records base model, data, settings and metrics. The upload is private and runs
# only with a token from Colab secrets or `HF_TOKEN`; without one it lists what would be sent.

# %%
card = lab.export_card(run)
if run.cfg["export"]["push_repo"]:
    lab.push_export(run)
print(f"Export → {run.display(run.export_dir)}")
