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

# The memory-size ablation (BMA-Memory Fig. 6) on the tiny preset, cut to fit a 2-core machine in
# minutes: fewer pairs, 2 epochs, a smaller evaluation. `avlab sweep` without these overrides
# runs the full tiny preset.
DEMO_OVERRIDES := train.epochs=2 data.paired_size=1024 data.unpaired_sound_size=512 \
	data.unpaired_image_size=512 data.train_size=500 data.test_size=250 \
	data.transfer_train_size=0 data.transfer_test_size=0 eval.features=[h]

demo: $(STAMP)
	$(VENV)/bin/avlab sweep search_spaces/memory_size_fig6.yaml --name demo-memory-size-$$(date +%Y%m%d-%H%M%S) $(DEMO_OVERRIDES)

test: $(STAMP)
	$(PY) -m pytest

# Downstream numbers of a random-init encoder, the tiny BMA run and a supervised encoder.
baselines: $(STAMP)
	$(PY) benchmarks/downstream_baselines.py

clean:
	rm -rf $(VENV) avlab-runs .pytest_cache
