# Two entry points for a newcomer (see README): `make demo` and `make test`.
# Each creates the virtual environment it needs (.venv) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install checkpoint benchmark mutation clean

# First use installs everything (5-10 minutes, mostly downloads); each step says what it does.
$(STAMP): pyproject.toml constraints.txt
	@echo "==> [1/4] system libraries for Qt and a virtual display (scripts/system-deps.sh; seconds, or a minute of apt-get)"
	@bash scripts/system-deps.sh
	@echo "==> [2/4] a Python virtual environment in $(VENV), with an up-to-date pip (under a minute)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "==> [3/4] torch 2.13.0, CPU build, pinned (a download of a few hundred MB: 1-3 minutes)"
	@# torch first and pinned: an unpinned resolve pulls the multi-GB CUDA build
	$(PY) -m pip install --progress-bar on -c constraints.txt torch==2.13.0
	@echo "==> [4/4] napari-cellclip and what it needs: napari + PyQt6, transformers, umap-learn, faiss, pytest (2-5 minutes)"
	$(PY) -m pip install --progress-bar on -c constraints.txt -e ".[pyqt6,dev]"
	@touch $(STAMP)
	@echo "==> $(VENV) is ready"

install: $(STAMP)

## Train (or reuse) the sample checkpoint, open napari with the sample plate embedded, ready for a query.
demo: $(STAMP)
	@bash scripts/demo.sh $(PY)

## Lint (ruff: style, bugs, and no Qt/napari import in the core or training), then run the test suite
## (widget tests run on a virtual X server via pytest-xvfb).
test: $(STAMP)
	@echo "==> running the test suite (widget tests on a virtual X server; about 8-15 minutes on 2 CPU cores)"
	$(PY) -m ruff check .
	$(PY) -m pytest

checkpoint: $(STAMP)
	$(PY) -m training fit

## Mutation testing, module by module (not in CI; see benchmarks/MUTATION.md). MODULES="ann store" for some.
mutation: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[mutation]"
	nice $(PY) scripts/mutation.py $(MODULES)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
