# Quickstart: `make demo` (the main job; DEMO_SIZE=small for a quick one) and `make test`. Each creates .venv if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[demo,test]'
	touch $(STAMP)

DEMO_SIZE ?= full
# Two pytest workers, one test file each at a time (module fixtures stay in one process): on 2 cores the suite
# took 873 s instead of 1,863 s serially (XLA compiles on one thread). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

demo: $(STAMP)
	$(VENV)/bin/alm demo --size $(DEMO_SIZE)

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
