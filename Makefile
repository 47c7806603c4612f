# The README's two commands: `make demo` and `make test`. Each runs the idempotent set-up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench-kernels clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/seer demo

test: setup
	$(PY) -m pytest -q

bench-kernels: setup
	$(PY) benchmarks/swav_head.py

clean:
	rm -rf runs .pytest_cache
