# amqp-jobs: `make demo` runs the end-to-end demo, `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
export AMQP_URL

.PHONY: demo test lint typecheck unit bench install clean worker

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "amqp-jobs needs Python 3.11+, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev,testing]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m examples.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy --strict amqp_jobs

test: lint typecheck
	$(BIN)/pytest

unit: install
	$(BIN)/pytest tests/unit

worker: install
	$(BIN)/amqp-jobs worker examples.shop.worker:app

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info

bench: install
	$(BIN)/python -m bench.run
