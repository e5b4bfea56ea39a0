# The two commands: `make demo` and `make test`. Each works on a fresh machine with only python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests run on a 2-core CI box: two xdist workers unless told otherwise.
TEST_WORKERS ?= 2

.PHONY: demo test test-slow lint install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxlab reproduce all --quick

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check jaxlab tests benchmarks experiments

clean:
	rm -rf $(VENV) runs .pytest_cache
