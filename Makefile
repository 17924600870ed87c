# make test: set up .venv and run the whole test suite (CPU only).
# make demo: set up .venv and segment the bundled sample case.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
DNA_PIN := dynamic-network-architectures==0.4.4

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The pinned CPU build first, unless a torch (a user's CUDA build) is already there.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test]"
	# nnU-Net's network package, for the fidelity tests; its deps would replace torch.
	$(PIP) install -q --no-deps $(DNA_PIN)
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q Testing

demo: setup
	$(PY) -m maml.cli demo

bench: setup
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf $(VENV)
