# switchyard — every target says what it does; `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv with switchyard and its dev tools

demo: $(STAMP) ## Run the whole pipeline on bundled sample jobs (SQLite, in-process broker, fake Claude)
	$(VENV)/bin/switchyard demo

demo-cascade: $(STAMP) ## The demo under the sample cascade policy: easy jobs worked by Haiku, escalating Haiku -> Sonnet -> Opus
	SWITCHYARD_CONFIG=pipeline/samples/cascade.toml $(VENV)/bin/switchyard demo

services: ## Start the local Postgres and Redis if they are not running
	@scripts/ensure-services

browser: ## Find or install (apt-get, as root) the chromium the dashboard's browser tests drive
	@scripts/ensure-browser

test: $(STAMP) services browser ## Run the test suite against the real Postgres and Redis (PYTEST_ARGS="..." for one plain pytest run)
	@scripts/run-tests $(PY) $(PYTEST_ARGS)

lint: $(STAMP) ## Ruff over the code, tests, benchmarks and migrations; mypy over pipeline/, workers/ and bench/
	$(VENV)/bin/ruff check pipeline workers tests bench migrations
	$(VENV)/bin/mypy pipeline workers bench

bench: $(STAMP) services ## Run the benchmarks (add BENCH_ARGS=--quick for a short run)
	$(PY) -m bench $(BENCH_ARGS)

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

.PHONY: help venv demo demo-cascade services browser test lint bench clean
