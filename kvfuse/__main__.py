"""`python -m kvfuse <command>`: each command lives in its own module exposing add_arguments(parser) and run(args)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    # name: (module, one-line help)
    "align-demo": ("kvfuse.eval.align_demo", "align GSM8K across the packaged SmolLM2 and Gemma3 tokenizers"),
    "dump": ("kvfuse.teacher.dump", "run teachers over a dataset and store their aligned KV (one shard)"),
    "report": ("kvfuse.eval.report", "write a self-contained HTML report of a training run"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m kvfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Import only the command being run: the others may need heavy libraries this call does not.
    chosen = [argv[0]] if argv and argv[0] in COMMANDS else list(COMMANDS)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name in chosen:
            importlib.import_module(module_name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError, RuntimeError, ImportError) as err:
        # Bad input is reported as one line naming what and where, not as a traceback from deep inside.
        # KVFUSE_DEBUG=1 re-raises for the full stack.
        if os.environ.get("KVFUSE_DEBUG"):
            raise
        print(f"python -m kvfuse {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
