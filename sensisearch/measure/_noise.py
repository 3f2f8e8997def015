"""How much to trust a set of speed figures, in one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sensisearch.measure._timing import PairedLatency


def noise_summary(latencies: Iterable[PairedLatency]) -> str:
    """One line: median relative CI width of the speed-ups, median ratio IQR, worst load and steal seen."""
    items = list(latencies)
    if not items:
        return "noise: no paired timings"
    widths = np.array([p.relative_ci_width for p in items])
    iqrs = np.array([p.ratio_iqr / p.speedup for p in items])
    loads = [p.load.load_avg_1m for p in items if p.load is not None and p.load.load_avg_1m is not None]
    steals = [p.load.cpu_steal for p in items if p.load is not None and p.load.cpu_steal is not None]
    cores = next((p.load.cpu_count for p in items if p.load is not None and p.load.cpu_count), None)
    parts = [
        f"noise over {len(items)} paired timings: speed-up 95% CI width median {100 * np.median(widths):.1f}% "
        f"(max {100 * widths.max():.1f}%)",
        f"per-round ratio IQR median {100 * np.median(iqrs):.1f}%",
    ]
    parts.append(f"max load avg {max(loads):.2f}" + (f" on {cores} cores" if cores else "") if loads else "load avg not reported")
    parts.append(f"max CPU steal {100 * max(steals):.1f}%" if steals else "CPU steal not reported")
    return "; ".join(parts)
