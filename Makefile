# Two commands a newcomer needs: `make test` and `make demo`.
# Both create .venv when it is missing and install the package into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 is pinned first so the CPU build lying on disk (or the wheel cache) is used
# instead of resolving a multi-GB CUDA build; pyproject's range admits it.
TORCH ?= torch==2.13.0

.PHONY: test demo study lint install clean

$(BIN)/segmentation: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# nnU-Net's PlainConvUNet for the training benchmark's peer test; --no-deps: its timm and
	# einops serve other architectures (and timm would pull torchvision)
	$(BIN)/python -m pip install -q --no-deps "dynamic-network-architectures>=0.4,<0.5"
	touch $(BIN)/segmentation

install: $(BIN)/segmentation

lint: install
	$(BIN)/ruff check segmentation tests scripts

# Two pytest workers (one per core of the 2-core reference machine; one thread each, see
# tests/conftest.py): many tests wait on subprocesses and file I/O, so two overlap well.
test: install lint
	$(BIN)/python -m pytest -q -n 2

demo: install
	$(BIN)/python scripts/demo.py

# The long-skip ablation in miniature (configs/study/quick.yaml) on the synthetic data, 2 runs
# at a time on the CPU; the report lands in runs/study/quick/report.md. Not part of `make test`.
study: install
	test -f data/synthetic/dataset.json || $(BIN)/segmentation data synth --out data/synthetic
	$(BIN)/segmentation study run configs/study/quick.yaml --runs-per-device 2

clean:
	rm -rf $(VENV) runs
