# The two set-up-and-go commands (see README): `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv/bin

.PHONY: setup run test
setup:
	bash scripts/setup_env.sh

run: setup
	DS_ACCELERATOR=$${DS_ACCELERATOR:-$$($(VENV)/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")} \
	  $(VENV)/python train/main.py --phase 1 --output_dir runs/phase1

test: setup
	bash scripts/setup_slurm.sh
	TRITON_INTERPRET=1 $(VENV)/python -m pytest -q -x --durations=15 tests
