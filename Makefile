# ATM Gateway: `make run` serves, `make test` tests, `make bench` measures.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: run test bench lint openapi clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/atm serve --host $${ATM_HOST:-127.0.0.1} --port $${ATM_PORT:-8080}

# Three test processes (pytest-xdist) on two cores: most tests wait on a database, a server
# or a subprocess for part of their time (back to back here: 542 s with three, 659 s with
# two). Compiling first spares each `atm` process the tests start from compiling the
# project again where PYTHONDONTWRITEBYTECODE is set.
TEST_WORKERS ?= 3
test: $(STAMP) browser
	@$(BIN)/python -m compileall -q gateway mappings orchestration bench
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# Debian's Chromium for tests/browser (a no-op when installed; ATM_SKIP_BROWSER_INSTALL=1 skips).
browser:
	@sh tools/ensure_chromium.sh $(CHROMIUM)

lint: $(STAMP)
	$(BIN)/ruff check gateway mappings orchestration tests bench tools
	$(BIN)/mypy

openapi: $(STAMP)
	$(BIN)/python -m gateway.openapi_dump openapi/openapi.json

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
