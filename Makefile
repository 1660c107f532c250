# Two commands on a fresh machine: `make demo` (serve, query, print) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-unit test-integration test-gpu lint format configs bench \
	bench-quick bench-runtimes bench-faults bench-sessions bench-replicas bench-embed-all bench-swap \
	bench-gpu-dry gpu-pack clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel on this machine's disk; anything
	# looser pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/dynemb demo

test: install lint
	$(PY) -m pytest tests -q --durations=30

test-unit: install
	$(PY) -m pytest tests/unit -q

test-integration: install
	$(PY) -m pytest tests/integration -q

test-gpu: install
	$(PY) -m pytest tests/gpu -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The serving benchmark (about 25 minutes, on a quiet machine, for the record) and its
# smoke run (about 2 minutes); both need a built repository (`make demo` builds one).
bench: install
	$(VENV)/bin/dynemb bench

bench-quick: install
	$(VENV)/bin/dynemb bench --quick

bench-runtimes: install
	$(VENV)/bin/dynemb bench-runtimes

bench-faults: install
	$(VENV)/bin/dynemb bench-faults

bench-sessions: install
	$(VENV)/bin/dynemb bench-sessions

bench-replicas: install
	$(VENV)/bin/dynemb bench-replicas

bench-embed-all: install
	$(VENV)/bin/dynemb bench-embed-all

bench-swap: install
	$(PY) benchmarks/swap_under_load.py --clients 16 --settle-seconds 20

# The GPU run (benchmarks/gpu/README.md): its dry run on the CPU (every phase, tiny sizes,
# about a minute), and what travels to a lent GPU machine (.gpu/, checked against 64 MiB).
bench-gpu-dry: install
	$(VENV)/bin/dynemb bench-gpu --device cpu --dry-run --out .cache/dynemb/bench-gpu-dry

gpu-pack: install
	$(PY) benchmarks/gpu/pack.py

configs: install
	$(VENV)/bin/dynemb configs

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
	find model_repository -mindepth 2 -maxdepth 2 -name '[0-9]*' ! -name 1 -type d \
	  -exec rm -rf {} +
	find model_repository -mindepth 2 -maxdepth 2 -name 1 -type d \
	  -exec find {} -mindepth 1 ! -name model.py ! -name .gitkeep -delete \;
