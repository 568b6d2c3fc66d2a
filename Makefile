# Two entry points: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.avlab-installed

.PHONY: demo test install baselines clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/avlab run --preset tiny --workers 2

test: $(STAMP)
	$(PY) -m pytest

# Downstream numbers of a random-init encoder, the tiny BMA run and a supervised encoder.
baselines: $(STAMP)
	$(PY) benchmarks/downstream_baselines.py

clean:
	rm -rf $(VENV) avlab-runs .pytest_cache
