# fedlit: `make quickstart` runs the offline default job, `make test` runs lint + the test suite.
# Both create .venv on first use (torch and torchvision are resolved together from the registry).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedlit-installed
PYTEST_ARGS ?=

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dataset-fashion-mnist

.PHONY: setup quickstart quickstart-png real-data test test-fast lint bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) real-data

# Debian's dataset-fashion-mnist (data.name=fashion_mnist, backbone.name=fashion-clip, configs/real_fashion.yaml),
# installed when missing and apt-get can run as root (refreshing the package lists once if the first try fails);
# otherwise a note: every other dataset works without it.
real-data:
	@test -f $(FASHION_MNIST) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { $(APT_INSTALL) >/dev/null || { apt-get update -q >/dev/null && $(APT_INSTALL) >/dev/null; }; }; } || \
	  echo "note: Fashion-MNIST is not installed; run: sudo apt-get install dataset-fashion-mnist"

quickstart: $(STAMP) real-data
	$(BIN)/python experiments/train.py --config configs/default.yaml

# docs/quickstart.png from the newest quickstart run (make quickstart first).
quickstart-png: $(STAMP)
	$(BIN)/python -m fedlit plot "$$(ls -d runs/quickstart/all-* | tail -n 1)" --out runs/quickstart-plots
	cp runs/quickstart-plots/overview.png docs/quickstart.png

lint: $(STAMP)
	$(BIN)/ruff check fedlit experiments tests benchmarks

test: lint real-data
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
