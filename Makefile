# The set-up commands: `make demo`, `make test` (the full suite, what CI runs) and `make test-fast`; each creates
# .venv when it is missing.
# On a GPU machine: `make gpu-check` (wheels from `make gpu-wheels`, run where there is network).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
GPU_WHEELS := .gpu-wheels
# Tests run in parallel processes (pytest-xdist); torch in each, and in the runs a test starts, takes one thread, so
# that two of them fill two cores without contending.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/pytest -n $(TEST_WORKERS)

.PHONY: demo test test-fast lint clean gpu-wheels gpu-check

demo: $(VENV)/.installed
	$(BIN)/music2vec demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(PYTEST) --dist loadfile  # a file's tests in one process: they share its module fixtures and SLURM nodes

# While working: everything but the tests marked slow (training runs, whole jobs, the demo) or slurm.
test-fast: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow and not slurm"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test,dev]'
	touch $@ $(VENV)/.installed

# Wheels of the dependencies a GPU machine's Python 3.12 lacks (it has torch and cannot reach PyPI).
gpu-wheels: $(VENV)/.installed-test
	$(BIN)/python bench/gpu_wheels.py --out $(GPU_WHEELS)

# The GPU acceptance suite, with $(PYTHON) the machine's own Python (its torch); results in $$OUT or gpu-check/.
gpu-check:
	$(PYTHON) bench/gpu_check.py --wheels $(GPU_WHEELS) --out $${OUT:-gpu-check}

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache $(GPU_WHEELS) .gpu-venv gpu-check
