# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test lint typecheck bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/clickphone-agi demo --output demo-output

lint: $(BIN)/.installed
	$(BIN)/ruff check clickphone_agi tests bench
	$(BIN)/ruff format --check clickphone_agi tests bench

typecheck: $(BIN)/.installed
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_storage.py
	$(BIN)/python bench/ami_ingest.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
