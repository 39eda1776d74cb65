# Pipeline Medic: `make demo` and `make test` are the whole quickstart.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The stamp is rebuilt whenever the declared dependencies change.
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench bench-serve clean prometheus

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; Pipeline Medic needs Python 3.11 (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: any other torch requirement would pull GBs of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pipemedic demo

# The serving tests scrape the service with a real Prometheus server (Debian's package).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing Prometheus (Debian package prometheus) for the serving tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

test: $(STAMP) prometheus
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/pipemedic bench sim

# The serving benchmark drives HTTP load with wrk (Debian package).
bench-serve: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >/dev/null; }
	$(BIN)/pipemedic bench serve

clean:
	rm -rf $(VENV) reports .pytest_cache .ruff_cache
