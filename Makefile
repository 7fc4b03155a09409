# The commands a new user needs: `make train` and `make test`. Each installs first.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DATA   := data/stdlib/train.bin

.PHONY: install train test test-fast bench lint format clean

# torch is pinned and installed on its own first: an unpinned resolve pulls a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(DATA): | $(STAMP)
	$(PY) scripts/prepare_data.py --out data/stdlib

train: $(STAMP) $(DATA)  ## the tiny MoE on CPU, 2 processes
	$(VENV)/bin/moe-launch train config=tiny

test: $(STAMP)  ## the whole suite, multi-process tests included
	$(PY) -m pytest

test-fast: $(STAMP)  ## skip the slow multi-process tests
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) scripts/bench_moe_layer.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs wandb .pytest_cache
