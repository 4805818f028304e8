# make demo: set up and run the local fine-tuning demo.  make test: set up and run the test suite.
# make bench: the performance suite (BENCH_ARGS=--quick for a few minutes).
VENV ?= .venv
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/orchestrator run --local jobs/local-smoke.yaml

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
