# Two entry points for a clean clone: `make demo` and `make test` (each sets up .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/activate: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[data,notebooks,dev]"
	touch $(BIN)/activate

.PHONY: setup demo test bench
setup: $(BIN)/activate

demo: setup
	$(BIN)/python -m tr_jax

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

bench: setup
	$(BIN)/tr-jax bench peers
