# The README's commands: `make run`, `make test`, `make install`, `make lint`, `make clean`.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

# Stamps: each install re-runs when pyproject.toml changes (or when .venv is deleted).
INSTALL_STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

# Debian packages the test suite needs. `make test` installs the missing ones with apt-get
# when it runs as root; otherwise it warns, the browser tests skip themselves and the
# PostgreSQL tests fail saying what to install. To add one: SYSTEM_PACKAGES += redis-server
SYSTEM_PACKAGES := chromium postgresql
SYSTEM_PACKAGES += redis-server nginx

.PHONY: help install run test lint format clean distclean system-packages bench

help:
	@echo "make run      install, create .env from .env.example if missing, serve with gunicorn"
	@echo "make test     install test dependencies and system packages, lint, run pytest"
	@echo "make install  create .venv and install the project into it"
	@echo "make lint     ruff check, ruff format --check, and hadolint on the Dockerfile"
	@echo "make clean    remove caches and build artefacts (keeps .venv, .env and instance/)"
	@echo "make bench    benchmark against the upstream and nginx into bench/results/ (~8 min;"
	@echo "              BENCH_QUICK=1: 2-minute smoke run; see docs/performance.md)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALL_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	@touch $@

# The test extras include the project itself, so the plain install is up to date as well.
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test]'
	@touch $(INSTALL_STAMP) $@

install: $(INSTALL_STAMP)

# Only created when missing: an existing .env is never overwritten.
.env:
	cp .env.example .env
	@echo "created .env from .env.example: put your OPENAI_API_KEY in .env"

run: install .env
	exec $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

system-packages:
	@missing=""; \
	for pkg in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null | grep -q ' installed$$' \
			|| missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then \
		echo "warning: missing system packages:$$missing; install them as root" \
			"(tests that need them will be skipped)" >&2; \
		exit 0; \
	fi; \
	echo "installing system packages:$$missing"; \
	apt-get update -qq </dev/null; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		$$missing </dev/null

test: $(TEST_STAMP) system-packages
	$(BIN)/ruff check app tests
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m pytest

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

format: $(TEST_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .coverage htmlcov test-results
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# The benchmark (docs/performance.md): its Python tools into .venv, Debian's nginx and wrk when
# missing (as root), then bench/run.py writes bench/results/report.md and chart.png.
bench: $(INSTALL_STAMP)
	$(PIP) install -r bench/requirements.txt
	@$(MAKE) --no-print-directory system-packages SYSTEM_PACKAGES="nginx wrk"
	$(BIN)/python bench/run.py
