# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo

.PHONY: demo test lint install clean compose-test gpu-wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision are pinned to the builds on this machine's disk; a newer pin would download GBs.
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedphd launch --out $(OUT)

# The whole suite, tests/test_compose.py (the compose test bed) included, so it runs once;
# it must really run (FEDPHD_COMPOSE_REQUIRED), not skip, where the engine can be installed.
test: $(STAMP)
	$(BIN)/ruff check .
	FEDPHD_COMPOSE_REQUIRED=1 $(BIN)/python -m pytest -ra --durations=30 tests

# The docker compose test bed alone: installs and starts the Docker engine when missing (as
# root), builds the image offline, runs 1 cloud, 2 edges and 4 clients, checks the results.
# FEDPHD_COMPOSE_REQUIRED: here a test bed that cannot run fails instead of skipping.
compose-test: $(STAMP)
	FEDPHD_COMPOSE_REQUIRED=1 $(BIN)/python -m pytest -ra tests/test_compose.py

# The offline wheelhouse of bench/gpu_check.sh (docs/benchmarks.md, "GPU check"): Python 3.12
# manylinux wheels in bench/gpu-wheels/ (git-ignored), never torch. GPU_WHEELS_PROVIDED: the
# packages the GPU machine already has (unset: the lent H200's; empty: ship everything).
gpu-wheels: $(STAMP)
	$(BIN)/python -m bench.gpu_wheels --out bench/gpu-wheels \
	    $(if $(filter undefined,$(origin GPU_WHEELS_PROVIDED)),,--provided "$(GPU_WHEELS_PROVIDED)")

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache build/compose-test
