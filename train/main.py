"""Multi-teacher KV distillation trainer: `deepspeed train/main.py --phase N [--config FILE] [--key value ...]`.

Also runs as `python train/main.py ...` (one process). DeepSpeed ZeRO-3 holds the student, the per-teacher adapters
and the router; teachers stay frozen outside the engine (online), or their aligned KV is read from an offline store
(`--teacher_store DIR`, made by `python -m kvfuse dump`). The run directory gets the resolved config,
metrics.jsonl, TensorBoard logs, DeepSpeed checkpoints (exact resume after a kill) and report.html.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python train/main.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

from kvfuse.hub import offline_unless_reachable  # noqa: E402
from train.config import load_config  # noqa: E402


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", type=int, required=True, choices=range(6), help="phase preset 0..5")
    parser.add_argument("--config", default=None, help="YAML preset (default train/configs/phaseN.yaml)")
    parser.add_argument("--output_dir", default=None, help="run directory (default runs/phaseN)")
    parser.add_argument("--teacher_store", default=None, help="read teacher KV from this offline store")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    return parser.parse_known_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> None:
    """One process without a launcher becomes a world of one, so the same ZeRO-3 code path runs everywhere."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    backend = "nccl" if device.startswith("cuda") else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    config = load_config(args.phase, args.config, overrides)
    if args.teacher_store:
        config["teacher_store"] = args.teacher_store
    if args.max_steps is not None:
        config["max_steps"] = args.max_steps
    config["output_dir"] = args.output_dir or config.get("output_dir") or f"runs/phase{args.phase}"
    if config["device"] == "auto":
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if config["device"] == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Imported here, after DS_ACCELERATOR is set: DeepSpeed warns when it has to guess the accelerator itself.
    from train.session import TrainingSession

    init_distributed(config["device"])
    return TrainingSession(config).run()


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    offline_unless_reachable()
    try:
        return run(args, overrides)
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as err:
        # One line that says what and where; KVFUSE_DEBUG=1 shows the traceback.
        if os.environ.get("KVFUSE_DEBUG"):
            raise
        print(f"train/main.py (rank {os.environ.get('RANK', 0)}): error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
