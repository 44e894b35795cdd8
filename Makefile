# The two commands the README promises: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: run check test lint typecheck bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP_RUN): requirements.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(STAMP_DEV): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	$(PY) bot.py

check: $(STAMP_RUN)
	$(PY) bot.py --check

test: $(STAMP_DEV)
	bash scripts/ensure-redis-server
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP_DEV) typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/check_sizes.py

# mypy --strict on all production code (core/, cogs/, bot.py, scripts/: see pyproject.toml).
typecheck: $(STAMP_DEV)
	$(VENV)/bin/mypy

bench: $(STAMP_DEV)
	bash scripts/ensure-redis-server
	for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
