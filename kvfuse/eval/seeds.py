"""Numbers over seeds as docs/RESULTS.md prints them: a "mean ± std" cell, and a seed band (mean line, ± one std
shaded) on a matplotlib axis."""
from __future__ import annotations

import statistics
from typing import Sequence


def mean_std_cell(values: Sequence[float], digits: int = 4) -> str:
    """"m ± s" over seeds (sample std; 0 for one seed), m with `digits` significant digits."""
    if not values:
        raise ValueError("mean_std_cell needs at least one value")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}g} ± {std:.2g}"


def seed_band(ax, series: Sequence[tuple[Sequence[float], Sequence[float]]], label: str, marker: str = "o-"):
    """One (x, y) series per seed → their mean against the first seed's x, ± one std shaded, on the points all
    seeds share (the shortest series). Returns the line."""
    import numpy as np

    n = min(len(x) for x, _ in series)
    xs = list(series[0][0][:n])
    ys = np.array([list(y[:n]) for _, y in series], dtype=float)
    mean = ys.mean(0)
    std = ys.std(0, ddof=1) if len(series) > 1 else np.zeros(n)
    line, = ax.plot(xs, mean, marker, label=f"{label} (n={len(series)})")
    ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    return line
