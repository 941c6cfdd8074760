# The two commands of the quickstart: `make train` and `make test`.
PYTHON ?= python
ARGS ?=

.PHONY: install train test lint bench

# `pip install -e` only when needed (~20 s each time): when this environment's cl_lightning is not this folder
# (another clone, a fresh venv), or pyproject.toml changed since this environment last installed here. The stamp
# names the environment. `make install` always reinstalls.
INSTALLED_FROM := $(shell $(PYTHON) -I -c "import importlib.util as u, pathlib; s = u.find_spec('cl_lightning'); \
	print(pathlib.Path(s.origin).resolve().parents[1] if s and s.origin else '')" 2>/dev/null)
STAMP := .installed-$(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])")
ifneq ($(INSTALLED_FROM),$(CURDIR))
.PHONY: $(STAMP)
endif

install:
	$(PYTHON) -m pip install -e ".[dev]"
	touch $(STAMP)

$(STAMP): pyproject.toml
	$(MAKE) --no-print-directory install

train: $(STAMP)
	$(PYTHON) train.py $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest -q -n auto --dist loadfile $(ARGS)

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

bench: $(STAMP)
	$(PYTHON) benchmarks/speed_permuted_mnist.py
