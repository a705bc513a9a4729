# pgveil developer entry points. `make test` is the one command CI runs (.ci/run).
#
# The venv is (re)installed only when pyproject.toml changes: the stamp file's name carries the
# hash of pyproject.toml, so an unchanged checkout skips pip entirely.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYPROJECT_HASH := $(shell sha256sum pyproject.toml 2>/dev/null | cut -c1-16)
STAMP  := $(VENV)/.installed-$(PYPROJECT_HASH)
PYTEST_ARGS ?=

.PHONY: venv test demo lint bench clean-venv

venv: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@# no system PostgreSQL server binaries: the demo and tests fall back to the pgserver wheel
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		$(PY) -m pip install --quiet --disable-pip-version-check pgserver
	@rm -f $(VENV)/.installed-*
	@touch $@

test: venv
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/pgveil demo

lint: venv
	$(VENV)/bin/ruff check proxy rewriters tests bench

bench: venv
	$(PY) bench/run.py $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
