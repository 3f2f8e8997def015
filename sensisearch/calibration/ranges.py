"""Calibration statistics for a study: collected once, cached, served per trial.

One inference pass over the largest sample count (in one deterministic order)
yields exact statistics for every smaller count, because each count is a
prefix of that order and the running histograms are snapshotted at each
prefix. Trials then derive thresholds from these statistics in milliseconds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import onnx

from sensisearch.calibration import StatisticsCache, ThresholdTable, collect_statistics, deterministic_order
from sensisearch.calibration.histogram import TensorStatistics
from sensisearch.model.analysis import ModelInfo
from sensisearch.quantize.config import CalibrationChoice
from sensisearch.quantize.placement import statistics_tensors
from sensisearch.quantize.ranges import TensorRange
from sensisearch.calibration.source import CalibrationSource

if TYPE_CHECKING:
    from sensisearch.calibration.statistics import StatisticsProgress

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 32
MIN_AMAX = 1e-12


class CalibrationRanges:
    """Per-trial activation ranges from cached statistics."""

    def __init__(self, statistics: Mapping[int, Mapping[str, TensorStatistics]]) -> None:
        self.table = ThresholdTable(statistics)

    def ranges(self, tensors: Sequence[str], choice: CalibrationChoice) -> dict[str, TensorRange]:
        amaxes = self.table.amaxes(choice, list(tensors))
        samples = self.table.resolve_samples(choice.samples)
        # An all-zero activation has amax 0; Q/DQ scales must be > 0 (TensorRT
        # rejects zero scales), and any positive scale quantizes zeros exactly.
        out: dict[str, TensorRange] = {}
        for name, amax in amaxes.items():
            amax = max(amax, MIN_AMAX)
            lowest = self.table.statistics(name, samples).min
            # The algorithms derive amax from |x|: their clipping applies to the
            # negative side too, so the asymmetric range is [max(min, -amax), amax].
            lower = min(0.0, max(lowest, -amax)) if lowest == lowest else -amax  # NaN-safe; +inf (no value) -> 0
            out[name] = TensorRange(amax=amax, nonnegative=lowest >= 0.0, min=lower)
        return out


def prepare_calibration(
    model_path: Path,
    model: onnx.ModelProto,
    info: ModelInfo,
    source: CalibrationSource,
    sample_counts: Sequence[int],
    *,
    seed: int,
    cache_dir: Path,
    threads: int | None,
    progress: StatisticsProgress | None = None,
    cached_only: bool = False,
) -> CalibrationRanges | None:
    """The study's calibration statistics: from the cache, else one FP32 pass (``progress`` reports it).

    ``cached_only`` (rewriting a finished study's results): None on a cache miss, never a pass.
    """
    tensors = statistics_tensors(model, info)
    checkpoints = sorted(set(int(c) for c in sample_counts))
    cache = StatisticsCache(cache_dir)
    key = cache.key(info.sha256, f"{source.fingerprint}|seed={seed}", checkpoints, 2048)
    statistics = cache.load(key)
    if statistics is not None and all(t in statistics[checkpoints[-1]] for t in tensors):
        log.info("calibration statistics from cache %s", key)
        return CalibrationRanges(statistics)
    if cached_only:
        return None
    order = deterministic_order(source.size, seed)[: checkpoints[-1]]
    batch = source.static_batch or CALIBRATION_BATCH

    def feeds() -> Iterator[dict]:
        for x in source.batches(order, batch):
            yield {source.input_name: x}

    log.info("collecting calibration statistics: %d tensors over %d samples", len(tensors), checkpoints[-1])
    statistics = collect_statistics(model_path, tensors, feeds(), checkpoints, intra_op_threads=threads or 0, progress=progress)
    cache.save(key, statistics)
    return CalibrationRanges(statistics)
