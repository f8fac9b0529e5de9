"""Nsight Compute's exports of `gpu_session.sh ncu` as one text report: what bounds each fused-loss kernel per codec.

    python -m bench.ncu_report DIR > report.txt      # anywhere: reads DIR/ncu_details.csv, DIR/ncu_sass_*_*.csv

Per codec and kernel launch: time, throughputs, issue-slot use, registers and local-memory spills (details page).
Per SASS page (the key pass, the first weight-gradient launch): the warp-stall reasons over all sampled
instructions, the loop body's instruction mix (the instructions executed most often, i.e. once per tile) with its
own stall samples, and the ten most-stalled instructions.
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import sys
from pathlib import Path

DETAILS = [("GPU Speed Of Light Throughput", "Duration"), ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"),
           ("GPU Speed Of Light Throughput", "DRAM Throughput"), ("GPU Speed Of Light Throughput", "L2 Cache Throughput"),
           ("Compute Workload Analysis", "Issue Slots Busy"), ("Compute Workload Analysis", "Executed Ipc Active"),
           ("Warp State Statistics", "Warp Cycles Per Issued Instruction"),
           ("Instruction Statistics", "Executed Instructions"), ("Launch Statistics", "Registers Per Thread"),
           ("Launch Statistics", "Dynamic Shared Memory Per Block"), ("Launch Statistics", "Grid Size"),
           ("Memory Workload Analysis", "Local Memory Spilling Requests")]


def details(path: Path) -> dict[str, list[tuple[str, dict]]]:
    """codec -> [(kernel name, {(section, metric): "value unit"})] in launch order, from the appended details CSVs
    (each codec's block starts with a '# codec NAME' line)."""
    out: dict[str, list[tuple[str, dict]]] = {}
    for block in path.read_text().split("# codec ")[1:]:
        codec, body = block.split("\n", 1)
        launches: dict[int, tuple[str, dict]] = {}
        for row in csv.DictReader(io.StringIO(body)):
            if not row.get("Metric Name"):
                continue
            name, metrics = launches.setdefault(int(row["ID"]), (row["Kernel Name"], {}))
            metrics[row["Section Name"], row["Metric Name"]] = f"{row['Metric Value']} {row['Metric Unit']}".strip()
        out[codec.strip()] = [launches[i] for i in sorted(launches)]
    return out


def sass(path: Path) -> list[dict]:
    """The rows of one SASS source page (its first line names the kernel)."""
    lines = path.read_text().splitlines()
    return list(csv.DictReader(lines[1:]))


def _num(v: str) -> float:
    return float((v or "0").replace(",", ""))


def opcode(source: str) -> str:
    words = [w for w in source.split() if not w.startswith("@")]
    return words[0].split(".")[0] if words else "?"


def sass_summary(rows: list[dict]) -> list[str]:
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    stalls = collections.Counter()
    for r in rows:
        for k in reasons:
            stalls[k[6:]] += _num(r[k])
    total = sum(stalls.values()) or 1.0
    lines = ["  stalls: " + " ".join(f"{k} {100 * v / total:.0f}%" for k, v in stalls.most_common(8))]
    counts = collections.Counter(r["Instructions Executed"] for r in rows if _num(r["Instructions Executed"]) > 0)
    hottest = max((c for c in counts if counts[c] >= 16), key=_num, default=None)
    if hottest is not None:
        body = [r for r in rows if r["Instructions Executed"] == hottest]
        mix = collections.Counter(opcode(r["Source"]) for r in body)
        samples = sum(_num(r["Warp Stall Sampling (All Samples)"]) for r in rows) or 1.0
        mine = sum(_num(r["Warp Stall Sampling (All Samples)"]) for r in body)
        lines.append(f"  loop body: {len(body)} instructions executed {hottest} times each (tile loops of the launch, "
                     f"{100 * mine / samples:.0f}% of the stall samples): "
                     + " ".join(f"{k} {v}" for k, v in mix.most_common(14)))
    top = sorted(rows, key=lambda r: -_num(r["Warp Stall Sampling (All Samples)"]))[:10]
    lines.append("  most stalled: " + "; ".join(
        f"{' '.join(r['Source'].split())[:48]} ({_num(r['Warp Stall Sampling (All Samples)']):.0f})" for r in top))
    return lines


def report(folder: Path) -> str:
    out = []
    launches = details(folder / "ncu_details.csv")
    for codec, kernels in launches.items():
        out.append(f"== {codec}")
        for i, (name, metrics) in enumerate(kernels):
            out.append(f"  [{i}] {name}: " + "; ".join(f"{m} {metrics.get((s, m), '-')}" for s, m in DETAILS))
    for path in sorted(folder.glob("ncu_sass_*_*.csv")):
        kind, codec = path.stem.split("_")[2:4]
        rows = sass(path)
        if rows and "Source" in rows[0]:
            out.append(f"== SASS {kind} {codec} ({len(rows)} instructions)")
            out += sass_summary(rows)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if not (args.folder / "ncu_details.csv").is_file():
        p.error(f"no ncu_details.csv in {args.folder} (bash bench/gpu_session.sh ncu writes it to $OUT)")
    print(report(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
