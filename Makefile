# SMIG: `make test` and `make demo` each do all the set-up they need, idempotently.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.smig-installed
PYTEST_ARGS ?=

.PHONY: setup system venv image lint typecheck pytest test demo bench clean

setup: system venv image

system:
	@bash scripts/setup-system.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

image: system venv
	$(BIN)/smig image build
	$(BIN)/smig image xen

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: venv
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test: setup lint typecheck pytest

demo: setup
	$(BIN)/smig demo

# The whole evaluation, under an hour: `smig bench all` (AIM against b3sum, detection latency,
# transient attacks, placement, migration, response time), the deeper AIM, ingest and demo
# scripts, then the statement of which goals are met.
bench: setup
	$(BIN)/smig bench all --write docs/BENCHMARKS.md
	$(BIN)/python bench/aim.py --write docs/BENCHMARKS.md
	$(BIN)/python bench/ingest.py --write docs/BENCHMARKS.md
	$(BIN)/python bench/demo.py --runs 3 --write docs/BENCHMARKS.md
	$(BIN)/smig bench goals --write docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
