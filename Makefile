# Bastion: one command to run the system, one to test it. Only python3 is needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench lock clean redis

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## run: start every service under honcho (embedded Redis and paper exchange unless REDIS_URL is set)
run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start

## test: lint, type-check and run the whole test suite
test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

## bench: print benchmark figures as JSON lines, each beside a bare redis-py baseline
bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m tests.bench

## lock: refresh constraints.txt from what is installed (after changing pyproject.toml)
lock:
	$(BIN)/python -m pip freeze --exclude-editable > constraints.txt

## redis: run the embedded Redis in the foreground
redis: $(STAMP)
	$(BIN)/python -m services.redis

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
