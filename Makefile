# The two commands of the quickstart: `make train` and `make test`.
PYTHON ?= python
ARGS ?=

.PHONY: install train test lint bench

install:
	$(PYTHON) -m pip install -e ".[dev]"

train: install
	$(PYTHON) train.py $(ARGS)

test: install
	$(PYTHON) -m pytest -q -n auto --dist loadfile $(ARGS)

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

bench: install
	$(PYTHON) benchmarks/speed_permuted_mnist.py
