"""Command-line entry point of kvfuse; COMMANDS lists what it runs."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # exposes add_arguments(parser) and run(args); imported only when its command runs
    summary: str
    loads_models: bool  # model names may be Hugging Face hub ids: go offline first when the hub is unreachable


COMMANDS = {
    "dump": Command("kvfuse.teacher.dump", "run teacher models over a dataset once and store their aligned "
                    "KV-cache on disk (one shard per call), so training can read it instead of running them", True),
    "report": Command("kvfuse.eval.report", "turn a training run directory into one self-contained HTML page "
                      "of curves, per-layer heatmaps and generations", False),
    "align-demo": Command("kvfuse.eval.align_demo", "align GSM8K token by token between the packaged SmolLM2 and "
                          "Gemma3 tokenizers and draw one alignment matrix", True),
}

DESCRIPTION = "kvfuse: multi-teacher KV-cache distillation tools. Training itself runs with train/main.py."
EPILOG = """examples:
  python -m kvfuse dump --teachers smollm2-135m-instruct smollm2-135m-instruct \\
      --teacher_prompts default cot --student smollm2-135m-instruct --out stores/phase1 --n_samples 10 --n_val 4
  python -m kvfuse report runs/phase1
  python -m kvfuse align-demo --n 50

`python -m kvfuse COMMAND --help` lists a command's options. Set KVFUSE_DEBUG=1 for full tracebacks.
Model names: tiny-llama, tiny-qwen2, tiny-gemma3 (random weights, for tests), smollm2-135m-instruct,
gemma3-270m (packaged), a .gguf file, a local Hugging Face folder, or a hub id (needs network, or
the model in the local Hugging Face cache; without network kvfuse switches to HF_HUB_OFFLINE=1)."""


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser with every command listed and only `command`'s options filled in: the other commands' modules
    import torch and transformers, which would make `--help` take many seconds."""
    parser = argparse.ArgumentParser(prog="python -m kvfuse", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command_spec in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=command_spec.summary, description=command_spec.summary)
        if name == command:
            importlib.import_module(command_spec.module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    spec = COMMANDS[args.command]
    if spec.loads_models:
        from kvfuse.hub import offline_unless_reachable

        offline_unless_reachable()
    module = importlib.import_module(spec.module)
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError, RuntimeError, ImportError) as err:
        # Bad input is reported as one line naming what and where, not as a traceback from deep inside.
        if os.environ.get("KVFUSE_DEBUG"):
            raise
        print(f"python -m kvfuse {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
