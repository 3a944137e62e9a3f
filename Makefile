# Two commands for a fresh clone: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
SHELL := /bin/bash
DEMO := results/demo

.PHONY: venv lock demo test lint format bench quality figures clean-demo

# requirements.lock: every package's exact version and hashes (make lock). uv installs it
# (INSTALLER=pip: plain pip, `pip install --require-hashes --no-deps -r requirements.lock`).
INSTALLER ?= uv
UV_COMPILE := uv pip compile requirements.txt --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/lockfile.py install --venv $(VENV) --installer $(INSTALLER)
	touch $(STAMP)

venv: $(STAMP)

# Re-resolve requirements.txt into requirements.lock (keeps the locked versions it can).
lock: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(UV_COMPILE) -o requirements.lock

# One progress line per job (tools/progress.py); Snakemake's whole output goes to the log.
# --max-threads 1: CORES jobs of one thread each at once. The demo's models are tiny; with two
# threads per job on a busy 2-core machine an epoch took 50x longer (docs/running.md).
demo: $(STAMP)
	@echo "make demo: synthetic data -> 3 classifiers -> 2 architectures x 2 folds -> report"
	@set -o pipefail; $(BIN)/snakemake --resources gpu=1 --configfile config/demo.yaml \
		--cores $(CORES) --max-threads 1 2>&1 | $(BIN)/python tools/progress.py \
		--log $(DEMO)/logs/snakemake.log --summary $(DEMO)/logs/run_time.json
	@echo
	@echo "Report: $(CURDIR)/$(DEMO)/report/report.html"

# One pytest-xdist worker per core (TEST_WORKERS=0: one process); tests/conftest.py keeps each
# module, and the modules sharing the session's workflow runs, on one worker.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

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
	$(BIN)/python bench/run_benchmark.py --output results/bench/benchmark.md --repeats 5 --scaling 10 20 40

# Quality benchmark: patient-level CV over kaggle-40, equal CPU seconds per variant, paired
# bootstrap CIs (docs/evaluation.md). QUALITY_ARGS e.g. "--only recipe plain" or "--report".
QUALITY_DATA ?= ../shared/data/kaggle-40
QUALITY_ARGS ?=
quality: $(STAMP)
	nice -n 10 $(BIN)/python bench/quality.py --data $(QUALITY_DATA) --work results/quality \
		--size 64 --folds 3 --budget 100 --threads 1 $(QUALITY_ARGS)


# The README's picture, layout and result tables (and docs/performance.md's throughput table),
# from the runs' report/metrics.json and benchmark files; rows it cannot redo are marked stale.
figures: $(STAMP)
	@if [ -f $(DEMO)/segmentation/overlays.png ]; then \
		cp $(DEMO)/segmentation/overlays.png docs/figures/overlays.png; \
		echo "docs/figures/overlays.png: from $(DEMO)"; fi
	$(BIN)/python tools/readme_layout.py
	$(BIN)/python tools/readme_figures.py --run demo=results/demo --run cpu=results/cpu \
		--bench real=results/bench/real.json

clean-demo:
	rm -rf results/demo
