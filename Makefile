# vgmedgen: two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing or stale (pyproject.toml or constraints.txt changed), install, then run.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=

.PHONY: venv demo demo-long test test-fast test-gpu lint format bench clean-venv

venv: $(STAMP)

# pip (not uv/poetry): pip takes torch 2.14.1 + torchvision 0.29.1 from this machine's cache.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py --config configs/demo.yaml

demo-long: $(STAMP)
	$(PY) jobs/demo.py --config configs/demo-long.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q --durations=10 -m "not integration and not gpu" $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -s $(PYTEST_ARGS)

# Benchmarks print ratios against a baseline run in the same process (see benchmarks/).
bench: $(STAMP)
	$(PY) benchmarks/synthderm_rate.py
	$(PY) benchmarks/dit_step_time.py
	$(PY) benchmarks/scoring.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/generate_plan.py
	$(PY) benchmarks/generate_throughput.py
	$(PY) benchmarks/worker_startup.py

lint: $(STAMP)
	$(VENV)/bin/ruff check vgmedgen jobs tests benchmarks
	$(VENV)/bin/ruff format --check vgmedgen jobs tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format vgmedgen jobs tests benchmarks
	$(VENV)/bin/ruff check --fix vgmedgen jobs tests benchmarks

clean-venv:
	rm -rf $(VENV)
