# The two commands: `make demo` (the whole pipeline on generated data) and `make test`.
# Both set up .venv first (scripts/setup.sh); later runs reuse it.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.demucs_dist-installed

.PHONY: setup test test-fast demo gpu-check lint typecheck format clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	@touch $@

# Tests run in parallel processes (pytest-xdist), one per core: ~4 min on 2 cores (docs/benchmarks.md).
# worksteal: a worker that runs out of tests takes queued ones from the other, so that the two end
# together (with the default `load`, one worker idled for the last ~50 s: 338-346 s against 298 s).
# Per-test balancing beat keeping each file on one worker (--dist loadfile): 453 s against 503 s.
PYTEST_PARALLEL ?= -n auto --dist worksteal

test: $(STAMP)
	$(COMPILE)
	$(PYTHON) -m pytest -q $(PYTEST_PARALLEL)

# Everything but the real multi-process runs and long songs (marked slow): under a minute.
test-fast: $(STAMP)
	$(COMPILE)
	$(PYTHON) -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

# The package's bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (CI machines set it),
# each of the ~100 processes a test run starts would otherwise compile it again (~0.15 s). Only a
# speed-up: a folder it cannot write to is no error.
COMPILE = $(PYTHON) -m compileall -q demucs_dist bench >/dev/null || true

demo: $(STAMP)
	bash launch/demo.sh

# The GPU path on every GPU here (CPU part only without one): a table in runs/gpu-check/gpu_check.md (docs/gpu.md).
gpu-check: $(STAMP)
	VENV=$(VENV) bash launch/gpu_check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-demo:
	rm -rf demo/
