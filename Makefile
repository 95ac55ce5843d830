# fedlit: `make quickstart` runs the offline default job, `make test` runs lint + the test suite.
# Both create .venv on first use (torch and torchvision are resolved together from the registry).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedlit-installed
PYTEST_ARGS ?=

.PHONY: setup quickstart quickstart-png test test-fast lint bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python experiments/train.py --config configs/default.yaml

# docs/quickstart.png from the newest quickstart run (make quickstart first).
quickstart-png: $(STAMP)
	$(BIN)/python -m fedlit plot "$$(ls -d runs/quickstart/all-* | tail -n 1)" --out runs/quickstart-plots
	cp runs/quickstart-plots/overview.png docs/quickstart.png

lint: $(STAMP)
	$(BIN)/ruff check fedlit experiments tests benchmarks

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: lint
	$(BIN)/python -m pytest -m "not multiprocess and not slurm and not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/round_time.py
	$(BIN)/python benchmarks/text_encoder.py
	$(BIN)/python benchmarks/scaling.py

# Everything that needs a GPU, one table in under 8 minutes (says so and exits 0 when no GPU is visible).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
