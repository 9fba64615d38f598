# The two commands of the README: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
PY := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake

.PHONY: setup demo-data demo test lint format

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

demo-data: setup
	$(PY) scripts/make_demo.py --out resources/demo

demo: demo-data
	$(SNAKEMAKE) --workflow-profile profiles/local --cores $(CORES)
	$(SNAKEMAKE) --workflow-profile profiles/local --report results/report.html

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check scripts tests
	$(VENV)/bin/ruff format --check scripts tests
	$(VENV)/bin/snakefmt --check Snakefile rules
	$(SNAKEMAKE) --lint

format: setup
	$(VENV)/bin/ruff format scripts tests
	$(VENV)/bin/snakefmt Snakefile rules
