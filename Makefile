# Two entry points for a newcomer (see README): `make demo` and `make test`.
# Each creates the virtual environment it needs (.venv) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install checkpoint benchmark clean

$(STAMP): pyproject.toml constraints.txt
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned resolve pulls the multi-GB CUDA build
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[pyqt6,dev]"
	touch $(STAMP)

install: $(STAMP)

## Train (or reuse) the sample checkpoint, open napari with the sample plate embedded, ready for a query.
demo: $(STAMP)
	bash scripts/demo.sh $(PY)

## Lint (ruff: style, bugs, and no Qt/napari import in the core or training), then run the test suite
## (widget tests run on a virtual X server via pytest-xvfb).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

checkpoint: $(STAMP)
	$(PY) -m training fit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
