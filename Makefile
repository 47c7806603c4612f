# The README's two commands: `make demo` and `make test`. Each runs the idempotent set-up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup photos demo test bench-kernels clean

setup:
	@bash scripts/setup.sh

# Opt-in: the Debian wallpaper packages whose real photos `seer data tiles` uses (~170 MB; not needed by the tests).
photos:
	@bash scripts/setup.sh --photos

demo: setup
	$(VENV)/bin/seer demo

test: setup
	$(PY) -m pytest -q

bench-kernels: setup
	$(PY) -m benchmarks.swav_head

clean:
	rm -rf runs .pytest_cache
