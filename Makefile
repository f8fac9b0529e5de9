# The two set-up-and-go commands (see README): `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv/bin

.PHONY: setup demo test
setup:
	bash scripts/setup_env.sh

demo: setup
	$(VENV)/python -m kvfuse align-demo --out runs/align-demo

test: setup
	TRITON_INTERPRET=1 $(VENV)/python -m pytest -q -x --durations=15 tests
