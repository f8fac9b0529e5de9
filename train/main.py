"""Multi-teacher KV distillation trainer: `deepspeed train/main.py --phase N [--config FILE] [--key value ...]`.

Also runs as `python train/main.py ...` (one process). DeepSpeed ZeRO-3 holds the student, the per-teacher adapters
and the router; teachers stay frozen outside the engine (online), or their aligned KV is read from an offline store
(`--teacher_store DIR`, made by `python -m kvfuse dump`). The run directory gets the resolved config,
metrics.jsonl, TensorBoard logs, DeepSpeed checkpoints (exact resume after a kill) and report.html.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from kvfuse.hub import offline_unless_reachable
from train.config import PHASES, ConfigError, TrainConfig, describe_keys, load_config


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, epilog=describe_keys(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", type=int, required=True, choices=PHASES, help="phase preset 0..5 (see below)")
    parser.add_argument("--config", default=None, help="YAML preset instead of train/configs/phaseN.yaml")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_known_args(argv)


def resolve_device(name: str) -> str:
    """`auto` → cuda when a GPU is visible, else cpu; a CUDA device that is not there is a ConfigError."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device' = {name!r} is not available: this machine has no CUDA GPU "
                              "visible to PyTorch; use --device cpu (or auto)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"config key 'device' = {name!r} is not available: {torch.cuda.device_count()} CUDA "
                              "GPU(s) visible")
    return name


def init_distributed(device: str) -> None:
    """One process without a launcher becomes a world of one, so the same ZeRO-3 code path runs everywhere."""
    import deepspeed

    from kvfuse.net import free_port

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())})
    backend = "nccl" if device.startswith("cuda") else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def prepare(args: argparse.Namespace, overrides: list[str]) -> TrainConfig:
    """The checked config of this run, with its device and output folder resolved."""
    config = load_config(args.phase, args.config, overrides)
    return replace(config, device=resolve_device(config.device),
                   output_dir=config.output_dir or f"runs/phase{args.phase}")


def run(config: TrainConfig) -> int:
    if config.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed(config.device)
    from train.session import TrainingSession

    session = TrainingSession(config)
    try:
        session.setup()
        return session.train()
    finally:
        session.cleanup()


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    offline_unless_reachable()
    try:
        return run(prepare(args, overrides))
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as err:
        # One line that says what and where; KVFUSE_DEBUG=1 shows the traceback.
        if os.environ.get("KVFUSE_DEBUG"):
            raise
        print(f"train/main.py (rank {os.environ.get('RANK', 0)}): error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
