# Two commands do all set-up on a fresh machine:
#   make demo   pretrain a small BERT on the bundled corpus and show what it learned
#   make test   run the test suite (what CI runs)
# Both create .venv with pip when it is missing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint clean

$(BIN)/selfsup-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/selfsup-installed
	$(BIN)/python recipes/demo.py

test: $(BIN)/selfsup-installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/selfsup-installed
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
