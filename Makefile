# make test: set up .venv and run the whole test suite (CPU only).
# make demo: set up .venv and segment the bundled sample case.
# make bench-tables: the paper's Tables 1 and 2 against nnU-Net v2 (hours; bench-tables-quick: about half an hour).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
DNA_PIN := dynamic-network-architectures==0.4.4
NNUNET_PIN := nnunetv2==2.8.1

# Mesa's software OpenGL, for rendering Slicer slice views offscreen (screenshot and its test).
SYSTEM_PACKAGES := libegl1 libegl-mesa0 libgbm1 libgl1-mesa-dri

.PHONY: setup system-deps test test-benchmarks demo bench bench-tables bench-tables-quick clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The pinned CPU build first, unless a torch (a user's CUDA build) is already there.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	# cpu-fast: OpenVINO (numpy, no torch), so the suite covers both inference backends; train:
	# nnU-Net's augmentation library, held to the torch already here.
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e ".[test,cpu-fast,train,elastix]"
	# nnU-Net's network package, for the fidelity tests; its deps would replace torch.
	$(PIP) install -q --no-deps $(DNA_PIN)
	# nnU-Net v2 itself, for the import-nnunet tests (they train and predict with it), held to the
	# torch already here; the torchvision and timm it pulls do not work with the CPU torch.
	$(PIP) install -q -c $(VENV)/torch-constraint.txt $(NNUNET_PIN)
	$(PIP) uninstall -q -y torchvision timm
	touch $@

setup: $(VENV)/.installed

system-deps:
	@if ! ldconfig -p | grep -q libEGL_mesa; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	  else echo "note: offscreen rendering needs $(SYSTEM_PACKAGES); its test will be skipped"; fi; \
	fi

# Two workers (the machines have 2 cores), a test file per worker at a time: the module-scoped
# fixtures (trained tiny models, phantoms) are built once. Files start longest first
# (Testing/conftest.py), not in xdist's order of most tests first.
test: setup system-deps
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder Testing

# The benchmark harnesses on tiny budgets (the paper's tables: about 6 minutes of CPU).
test-benchmarks: setup
	MAML_TEST_BENCHMARKS=1 $(PY) -m pytest -q Testing/test_paper_tables.py

demo: setup
	$(PY) -m maml.cli demo

bench: setup
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_pipeline.py

# nnU-Net v2 beside the pinned torch (its own setup step: constraints file, then without the
# torchvision and timm it pulls), then every arm with the shared budget; results in benchmarks/results/.
bench-tables: setup
	$(PY) benchmarks/paper_tables.py --setup
	$(PY) benchmarks/paper_tables.py

bench-tables-quick: setup
	$(PY) benchmarks/paper_tables.py --setup
	$(PY) benchmarks/paper_tables.py --quick

clean:
	rm -rf $(VENV)
