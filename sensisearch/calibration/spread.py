"""Per-tensor sensitivity to the calibration choice: its amax under each algorithm.

A tensor whose percentile / entropy / MSE threshold sits far below its min-max
has outliers that min-max would spend INT8 levels on (it "needs clipping"); a
tensor where they all agree does not care which algorithm is used. This module
only tabulates; the thresholds come from the single-algorithm functions in
:mod:`sensisearch.calibration.thresholds` (one home for each algorithm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice

from .thresholds import compute_amax

if TYPE_CHECKING:
    from .histogram import TensorStatistics

DEFAULT_SPREAD_PERCENTILES = (99.9, 99.99, 99.999)
MINMAX_LABEL = CalibrationAlgorithm.MINMAX.value


def calibration_label(algorithm: CalibrationAlgorithm | str, percentile: float | None = None) -> str:
    """``"minmax"``, ``"entropy"``, ``"mse"`` or ``"percentile 99.99"`` (the keys of :attr:`TensorThresholds.amax`)."""
    algorithm = CalibrationAlgorithm(algorithm)
    if algorithm.reads_percentile and percentile is not None:
        return f"{algorithm.value} {percentile:g}"
    return algorithm.value


@dataclass(frozen=True)
class TensorThresholds:
    """amax of one activation tensor under each calibration algorithm.

    ``amax`` maps :func:`calibration_label` to the threshold; it always holds
    ``"minmax"``. ``clipping[label] = amax[label] / amax["minmax"]`` (1.0 = no
    clipping; 1.0 for an all-zero tensor, where every algorithm gives 0).
    """

    tensor: str
    amax: Mapping[str, float]
    clipping: Mapping[str, float] = field(init=False)

    def __post_init__(self) -> None:
        if MINMAX_LABEL not in self.amax:
            raise ValueError(f"TensorThresholds of {self.tensor!r} needs the min-max amax")
        minmax = self.amax[MINMAX_LABEL]
        ratios = {label: (value / minmax if minmax > 0 else 1.0) for label, value in self.amax.items()}
        object.__setattr__(self, "clipping", ratios)

    @property
    def minmax(self) -> float:
        return self.amax[MINMAX_LABEL]

    @property
    def strongest_clipping(self) -> tuple[str, float]:
        """(label, ratio) of the algorithm that clips this tensor most (smallest amax / minmax)."""
        label = min(self.clipping, key=lambda k: (self.clipping[k], k))
        return label, self.clipping[label]


def threshold_spread(
    statistics: Mapping[str, TensorStatistics],
    algorithms: Sequence[CalibrationAlgorithm | str] = tuple(CalibrationAlgorithm),
    percentiles: Sequence[float] = DEFAULT_SPREAD_PERCENTILES,
) -> list[TensorThresholds]:
    """amax of every tensor under every algorithm (each percentile separately), in input order.

    ``statistics`` are the statistics at ONE sample count (e.g.
    ``collect_statistics(...)[count]`` or a cached ``StatisticsByCount[count]``).
    Min-max is always included (the ratios are relative to it); ``percentiles``
    are used only when ``percentile`` is among ``algorithms``. Thresholds are
    computed exactly as a trial computes them (:func:`compute_amax`: capped at
    the observed max|x|).
    """
    try:
        chosen = [CalibrationAlgorithm(a) for a in algorithms]
    except ValueError:
        known = ", ".join(a.value for a in CalibrationAlgorithm)
        raise SensisearchError(f"unknown calibration algorithm in {list(algorithms)}; use any of {known}") from None
    choices = [CalibrationChoice(CalibrationAlgorithm.MINMAX)]
    for algorithm in dict.fromkeys(chosen):
        if algorithm is CalibrationAlgorithm.MINMAX:
            continue
        if algorithm is CalibrationAlgorithm.PERCENTILE:
            if not percentiles:
                raise SensisearchError("percentile calibration needs at least one percentile (e.g. 99.99)")
            for p in dict.fromkeys(float(p) for p in percentiles):
                if math.isnan(p) or not 0.0 < p <= 100.0:
                    raise SensisearchError(f"calibration percentile must be in (0, 100], got {p}")
                choices.append(CalibrationChoice(algorithm, percentile=p))
        else:
            choices.append(CalibrationChoice(algorithm))
    labels = [calibration_label(c.algorithm, c.percentile) for c in choices]
    return [
        TensorThresholds(name, {label: compute_amax(stats, c) for label, c in zip(labels, choices)})
        for name, stats in statistics.items()
    ]
