# The two commands a new user needs: `make demo` (whole workflow on the built-in demo cohort)
# and `make test`. Both create .venv with the pinned dependencies when it is missing.
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
PRESET ?= config/presets/cpu-small.yaml

.PHONY: demo test lint fmt bench bench-gpu report clean

$(BIN)/.hemocam-installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: $(BIN)/.hemocam-installed
	$(BIN)/snakemake --cores $(CORES) --configfile $(PRESET)
	$(BIN)/snakemake --configfile $(PRESET) --report report.html

test: $(BIN)/.hemocam-installed
	$(BIN)/python -m pytest tests

lint: $(BIN)/.hemocam-installed
	$(BIN)/snakemake --lint --configfile $(PRESET)
	$(BIN)/snakefmt --check Snakefile workflow/rules

fmt: $(BIN)/.hemocam-installed
	$(BIN)/snakefmt Snakefile workflow/rules

report: $(BIN)/.hemocam-installed
	$(BIN)/snakemake --configfile $(PRESET) --report report.html

bench: $(BIN)/.hemocam-installed
	$(BIN)/python benchmarks/run_all.py

bench-gpu: $(BIN)/.hemocam-installed
	PYTHON=$(BIN)/python bash benchmarks/gpu.sh

clean:
	rm -rf results logs resources .snakemake
