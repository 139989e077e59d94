# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (if missing) and install the project with the pins of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pip installs without byte-compiling (--no-compile: about 40 s of a 2-core machine's setup, most
# of it for modules no command here imports) and Python caches the bytecode of what it does
# import on first use, as it does by default. An environment's PYTHONDONTWRITEBYTECODE would
# turn that cache off and make every process compile torch's imports again (+8 s each), so the
# targets below run without it; __pycache__ folders are git-ignored.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test test-all lint bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile --upgrade pip
	$(PIP) install -q --no-compile -c constraints.txt -e ".[service,vqa,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m gridfeats demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The full suite including slow cases (all parity images, kill-9 rounds at every point).
test-all: $(STAMP)
	$(PY) -m pytest -q --runslow $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/extract.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
