# Two entry points: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.avlab-installed

.PHONY: demo test test-fast install baselines docs docs-build clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Random initialisation against BMA-Memory's L_pair, four seeds each, on the small preset cut to
# fit a 2-core machine in under ten minutes (search_spaces/demo_learning.yaml says how).
demo: $(STAMP)
	$(VENV)/bin/avlab sweep search_spaces/demo_learning.yaml --name demo-learning-$$(date +%Y%m%d-%H%M%S)

# Two pytest workers (pytest-xdist), one test file each at a time, so module fixtures are built
# once; the files go longest first by the seconds of their selected tests in tests/durations.json
# (refresh it with `$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --store-durations`).
# TEST_WORKERS=0 runs the suite in this process. Times: benchmarks/RESULTS.md, "Test suite".
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# For work in progress: every test that needs no Ray start (those not marked slow; the slow ones
# start Ray, inject faults, run clusters), on the same two workers. `make test` stays the suite
# that CI runs.
test-fast: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

# Downstream numbers of a random-init encoder, the tiny BMA run and a supervised encoder.
baselines: $(STAMP)
	$(PY) benchmarks/downstream_baselines.py

# The documentation site (mkdocs.yml, sources in docs/): built into site/ with every link
# checked, then served on 127.0.0.1:8000 until Ctrl-C. The reference pages are generated from
# the code: `$(PY) -m orchestrator.reference` rewrites them (a test fails when they are stale).
docs: docs-build
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

docs-build: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) avlab-runs .pytest_cache site
