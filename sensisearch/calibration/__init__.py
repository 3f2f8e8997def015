"""Activation calibration: one FP32 statistics pass, thresholds per trial in milliseconds."""

from .histogram import DEFAULT_NBINS, TensorStatistics, update_statistics
from .spread import DEFAULT_SPREAD_PERCENTILES, TensorThresholds, calibration_label, threshold_spread
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
    mixed_amax,
    mse_amax,
    mse_errors,
    needs_clipping,
    percentile_amax,
    quantization_error,
)

__all__ = [
    "DEFAULT_NBINS",
    "DEFAULT_SPREAD_PERCENTILES",
    "StatisticsByCount",
    "StatisticsCache",
    "TensorStatistics",
    "TensorThresholds",
    "ThresholdTable",
    "calibration_label",
    "collect_statistics",
    "compute_amax",
    "deterministic_order",
    "entropy_amax",
    "entropy_divergences",
    "minmax_amax",
    "mixed_amax",
    "mse_amax",
    "mse_errors",
    "needs_clipping",
    "percentile_amax",
    "quantization_error",
    "threshold_spread",
    "update_statistics",
]
