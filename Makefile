# RetailSim pipeline — the two commands of the README, and a few helpers.
#   make demo   generate the demo data and materialize every asset (idempotent)
#   make test   run the test suite (what CI runs)
# Both create .venv on first use. torch is installed first, pinned to the CPU wheel, so that no
# dependency can pull the several-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export RETAILSIM_DATA_DIR ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(CURDIR)

.PHONY: venv demo test bench ui clean-data

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(BIN)/retailsim generate --preset demo
	$(BIN)/retailsim run
	@$(BIN)/retailsim where

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python benchmarks/bench_prep.py --json $(RETAILSIM_DATA_DIR)/bench_prep.json

clean-data:
	rm -rf $(RETAILSIM_DATA_DIR)/transactions $(RETAILSIM_DATA_DIR)/quarantine $(RETAILSIM_DATA_DIR)/samples \
	       $(RETAILSIM_DATA_DIR)/cache $(RETAILSIM_DATA_DIR)/dagster

# The Dagster UI (webserver + daemon) and the MLflow UI on the project's stores, bound to 127.0.0.1:
# http://127.0.0.1:3000 and http://127.0.0.1:5000. Ctrl-C stops both.
ui: venv
	$(BIN)/retailsim ui
