"""Loading a packaged model from the converted cache: how long `kvfuse.models.load(alias)` takes once the GGUF has
been de-quantised (the first load converts; every later one reads the cached HF folder). A speed, so measured here
and not asserted in a test (a busy machine would fail such a test).

Prints one line per model; appends CSV rows (device, commit) to bench/results/load.csv.

    python -m bench.bench_load                                   # both packaged models, 3 repeats each
    python -m bench.bench_load --models smollm2-135m-instruct --repeats 1
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.common import append_csv, commit, device_name
from kvfuse.models import PACKAGED_MODELS, load
from kvfuse.models.load import ensure_converted

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(PACKAGED_MODELS), choices=sorted(PACKAGED_MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", default=str(ROOT / "bench/results/load.csv"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rows = []
    for alias in args.models:
        ensure_converted(alias)  # the one-off conversion is not what this measures
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model, _ = load(alias)
            seconds.append(time.perf_counter() - start)
            del model
        median = statistics.median(seconds)
        print(f"{alias}: load from the cache {median:.2f} s (median of {args.repeats}; all: "
              f"{', '.join(f'{s:.2f}' for s in seconds)})")
        rows.append({"device": device_name(torch.device("cpu")), "commit": commit(), "model": alias,
                     "repeats": args.repeats, "median_s": round(median, 3), "min_s": round(min(seconds), 3)})
    append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
