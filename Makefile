# The handful of verbs people use. `make demo` and `make test` run `setup` first, so each is one
# command on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all lint format bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt scripts/setup.sh
	bash scripts/setup.sh $(PY) $(VENV)
	touch $(STAMP)

demo: setup
	$(BIN)/python train.py experiment=avsr_decorr

test: setup
	$(BIN)/python -m pytest -q tests

test-all: setup
	$(BIN)/python -m pytest -q tests -m "slow or not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# The real benchmark needs a GPU (benchmarks/RESULTS.md has the H200 figures and the command);
# here it runs on tiny shapes, to check the script.
bench: setup
	$(BIN)/python benchmarks/objective_throughput.py $(if $(GPU),,--tiny) --repeats 2 --json artifacts/bench/objectives.json
	$(if $(GPU),PYTHON=$(BIN)/python OUT=artifacts/bench bash benchmarks/gpu_fastpath.sh,$(BIN)/python benchmarks/fast_path.py lm1b --tiny --rows bare,plain,fast --json artifacts/bench/fastpath_tiny.json)

clean:
	rm -rf outputs .pytest_cache
