# The two commands of the README: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
PY := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake

# `snakemake --profile slurm` searches ./slurm, ~/.config/snakemake/slurm ($XDG_CONFIG_HOME) and
# /etc/xdg/snakemake/slurm, never profiles/: `make setup` links the user's profile folder here.
SNAKEMAKE_PROFILES := $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake

.PHONY: setup slurm-profile demo-data demo comparison test test-fast lint format

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed slurm-profile

slurm-profile:
	@mkdir -p "$(SNAKEMAKE_PROFILES)"
	@if [ -e "$(SNAKEMAKE_PROFILES)/slurm" ] && [ ! -L "$(SNAKEMAKE_PROFILES)/slurm" ]; then \
		echo "$(SNAKEMAKE_PROFILES)/slurm exists and is not a link: left alone;" \
		     "use: snakemake --profile $(CURDIR)/profiles/slurm"; \
	else \
		ln -sfn "$(CURDIR)/profiles/slurm" "$(SNAKEMAKE_PROFILES)/slurm" && \
		echo "snakemake --profile slurm -> $(CURDIR)/profiles/slurm"; \
	fi

demo-data: setup
	$(PY) scripts/tools/make_demo.py --out resources/demo

demo: demo-data
	$(SNAKEMAKE) --workflow-profile profiles/local --cores $(CORES)
	$(SNAKEMAKE) --workflow-profile profiles/local --report results/report.html

# The EAGLE paper's comparison grid on the demo cohort (EAGLE and its k ablation, CHIEF,
# Prov-GigaPath, TITAN, MADELEINE, PRISM, COBRA and mean pooling, at demo magnifications).
COMPARISON := --configfile config/config.yaml config/comparison.yaml
comparison: demo-data
	$(SNAKEMAKE) --workflow-profile profiles/local --cores $(CORES) $(COMPARISON)
	$(SNAKEMAKE) --workflow-profile profiles/local --report results/report.html $(COMPARISON)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slurm and not workflow"

lint: setup
	$(VENV)/bin/ruff check scripts tests
	$(VENV)/bin/ruff format --check scripts tests
	$(VENV)/bin/snakefmt --check Snakefile rules
	$(SNAKEMAKE) --lint

format: setup
	$(VENV)/bin/ruff format scripts tests
	$(VENV)/bin/snakefmt Snakefile rules
