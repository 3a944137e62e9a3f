# Two commands for a fresh clone: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
SHELL := /bin/bash
DEMO := results/demo

.PHONY: venv demo test lint format bench quality figures clean-demo

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# One progress line per job (tools/progress.py); Snakemake's whole output goes to the log.
demo: $(STAMP)
	@echo "make demo: synthetic data -> 3 classifiers -> 2 architectures x 2 folds -> report"
	@set -o pipefail; $(BIN)/snakemake --resources gpu=1 --configfile config/demo.yaml \
		--cores $(CORES) 2>&1 | $(BIN)/python tools/progress.py \
		--log $(DEMO)/logs/snakemake.log --summary $(DEMO)/logs/run_time.json
	@echo
	@echo "Report: $(CURDIR)/$(DEMO)/report/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile rules/
	$(BIN)/snakemake --lint
	$(BIN)/snakemake --lint --configfile config/demo.yaml

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/snakefmt Snakefile rules/

bench: $(STAMP)
	$(BIN)/python bench/run_benchmark.py --output results/bench/benchmark.md --scaling 10 20 40

# Quality benchmark: patient-level CV over kaggle-40, equal CPU seconds per variant, paired
# bootstrap CIs (docs/evaluation.md). QUALITY_ARGS e.g. "--only recipe plain" or "--report".
QUALITY_DATA ?= ../shared/data/kaggle-40
QUALITY_ARGS ?=
quality: $(STAMP)
	nice -n 10 $(BIN)/python bench/quality.py --data $(QUALITY_DATA) --work results/quality \
		--size 64 --folds 3 --budget 100 --threads 1 $(QUALITY_ARGS)

# The README's result tables, from the runs' report/metrics.json and benchmark files.
figures: $(STAMP)
	$(BIN)/python tools/readme_figures.py --run demo=results/demo --run cpu=results/cpu \
		--bench real=results/bench/real.json

clean-demo:
	rm -rf results/demo
