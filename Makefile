# pgveil developer entry points. `make test` is the one command CI runs (.ci/run).
#
# The venv is (re)installed only when pyproject.toml, setup.py or a module that setup.py compiles
# with mypyc changes: the stamp file's name carries their hash, so an unchanged checkout skips pip
# entirely, and `make test` always runs the compiled hot path of the sources as they are.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
COMPILED := proxy/server.py proxy/session.py proxy/audit.py proxy/audit_sinks.py proxy/operator.py
PYPROJECT_HASH := $(shell cat pyproject.toml setup.py $(COMPILED) 2>/dev/null | sha256sum | cut -c1-16)
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
