"""Activation calibration: one FP32 statistics pass, thresholds per trial in milliseconds."""

from .histogram import DEFAULT_NBINS, TensorStatistics, update_statistics
from .statistics import (
    StatisticsByCount,
    StatisticsCache,
    collect_statistics,
    deterministic_order,
)
from .thresholds import (
    ThresholdTable,
    compute_amax,
    entropy_amax,
    entropy_divergences,
    minmax_amax,
    mse_amax,
    mse_errors,
    percentile_amax,
)

__all__ = [
    "DEFAULT_NBINS",
    "StatisticsByCount",
    "StatisticsCache",
    "TensorStatistics",
    "ThresholdTable",
    "collect_statistics",
    "compute_amax",
    "deterministic_order",
    "entropy_amax",
    "entropy_divergences",
    "minmax_amax",
    "mse_amax",
    "mse_errors",
    "percentile_amax",
    "update_statistics",
]
