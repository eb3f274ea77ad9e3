# The two commands: `make demo` (the whole pipeline on generated data) and `make test`.
# Both set up .venv first (scripts/setup.sh); later runs reuse it.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.demucs_dist-installed

.PHONY: setup test demo lint format clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	@touch $@

test: $(STAMP)
	$(PYTHON) -m pytest -q

demo: $(STAMP)
	bash launch/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-demo:
	rm -rf demo/
