"""Clipping thresholds (amax) for symmetric INT8 quantization from tensor statistics.

Every function is pure and works on the |x| histogram of
:class:`~sensisearch.calibration.histogram.TensorStatistics`: ``counts`` (bin j
covers ``[j*w, (j+1)*w)``) and ``bin_width`` w. The returned amax is the
positive clipping threshold; the quantizer then uses ``scale = amax / 127``.

Implementation notes (see /work/shared/docs/field-notes.md section 3):

* ``percentile_amax`` returns the UPPER edge of the bin where the CDF reaches p,
  so at least p% of |x| is <= amax. pytorch-quantization and ONNX Runtime index
  the edge array with the same bin index, i.e. return that bin's LOWER edge,
  one bin width lower.
* ``entropy_amax`` is the TensorRT method (Migacz, GTC 2017) as implemented by
  pytorch-quantization (``_compute_amax_entropy``), except the threshold is
  ``(i + 0.5) * w`` (TensorRT / TPU-MLIR restatement) instead of edge ``i * w``,
  and outliers folded into an EMPTY last bin get a small eps in Q instead of
  KL=+inf (otherwise one far outlier behind a gap forces amax=max; see
  :func:`entropy_divergences`).
  It is NOT ONNX Runtime's entropy variant (signed histogram, symmetric windows,
  smoothing; with ORT's default 128 bins it degenerates to min-max).

  Checked against TensorRT's published algorithm: on real YOLOv5n
  histograms it picks the same candidate bin as a line-by-line port of
  pytorch-quantization's ``_compute_amax_entropy`` (tests/test_calibration.py),
  and finds the known optimum of a constructed histogram. The empty-bin eps
  changed no YOLOv5n threshold; the half-bin (i + 0.5 vs i) moved all-INT8 mAP
  by 0.06 points. The histogram is updated batch by batch, as TensorRT's is
  (NVIDIA/TensorRT#1411: "the histogram is updated when you see every batch");
  2048 bins laid exactly over [0, max] (a second pass) clipped harder and lost
  more (benchmarks/calibration_accuracy.py: -11.9 vs -6.5 mAP). Entropy's large
  YOLOv5n drop is the algorithm's (it clips SiLU tails to ~0.1-0.3 x max on
  early layers), not an implementation slip; ONNX Runtime's "entropy" scores
  better there because with its defaults it barely clips (median amax 0.8 x
  min-max vs 0.6 for ours and for pytorch-quantization's).
* ``mse_amax`` follows pytorch-quantization's ``_compute_amax_mse`` (bin centres
  fake-quantized with 127 levels, weighted squared error).
* ``mixed_amax`` ("percentile where a tensor needs clipping, min-max
  elsewhere"): per tensor, the percentile amax when :func:`needs_clipping` (that
  amax at least halves the MSE criterion's error against min-max), else min-max.

Algorithms x implementations are not bit-identical across toolkits; sensisearch
logs the amax per tensor so results stay traceable.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice

from .histogram import TensorStatistics

logger = logging.getLogger(__name__)

INT8_LEVELS = 127  # symmetric int8: [-127, 127]


def _cap(amax: float, observed_max: float | None) -> float:
    return float(min(amax, observed_max)) if observed_max is not None else float(amax)


def minmax_amax(stats: TensorStatistics) -> float:
    """max(|min|, |max|) of the observed values (0.0 if nothing finite was seen)."""
    return stats.amax


def percentile_amax(
    counts: np.ndarray, bin_width: float, percentile: float, observed_max: float | None = None
) -> float:
    """Upper edge of the first bin at which the CDF of |x| reaches ``percentile`` %.

    Capped at ``observed_max`` when given (the edge can overshoot the data).
    """
    if not (0.0 < percentile <= 100.0) or math.isnan(percentile):
        raise SensisearchError(f"calibration percentile must be in (0, 100], got {percentile}")
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0 or bin_width <= 0:
        return 0.0
    cdf = np.cumsum(counts)
    # Compare integer counts with p*total: no rounding from normalising the CDF.
    idx = int(np.searchsorted(cdf, percentile / 100.0 * total, side="left"))
    idx = min(idx, counts.size - 1)
    return _cap((idx + 1) * bin_width, observed_max)


EMPTY_BIN_EPS = 1e-4  # in samples; the eps of MXNet/ORT smooth_distribution


def entropy_divergences(
    counts: np.ndarray,
    num_quant_levels: int = 128,
    start_bin: int = 128,
    suppress_zero_spike: bool = True,
    empty_bin_eps: float = EMPTY_BIN_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) for every candidate bin count ``i``; returns ``(candidates, kl)``.

    Candidates are ``i = start_bin .. nbins`` inclusive (like pytorch-quantization;
    ``i = nbins`` means no clipping and always has a finite KL).

    For candidate i: P = counts[:i] with the outliers sum(counts[i:]) added to
    P[i-1]; Q = counts[:i] merged into ``num_quant_levels`` levels (bin j -> level
    floor(levels*j/i), identical to pytorch-quantization's linspace/digitize
    mapping since i/levels is exact in binary) and expanded back over the
    NON-ZERO source bins of each level only. P and Q are normalised; terms with
    P=0 contribute 0.

    P>0 where Q=0 can only happen at the last bin (i-1): outliers folded into an
    empty bin. pytorch-quantization (scipy.stats.entropy, no smoothing) gets
    +inf there, which excludes EVERY clipping candidate once a far outlier sits
    beyond a gap of empty bins (e.g. 1e5 N(0,1) samples + one value at 100 ->
    amax = max), unlike TensorRT, which clips such outliers. Our documented
    choice: that bin of Q gets ``empty_bin_eps`` samples (1e-4, MXNet/ORT's
    smoothing eps) before normalisation, so the candidate pays a finite
    penalty ~ (O/S) log(O/eps). ``empty_bin_eps=0`` reproduces
    pytorch-quantization (+inf). A candidate with no mass inside (T=0) is +inf.

    ``suppress_zero_spike``: counts[0] := counts[1] first, as pytorch-quantization
    does, so a ReLU's huge zero bin does not dominate the divergence.

    Vectorised in closed form from prefix sums (O(candidates x levels) instead of
    O(candidates x nbins)):
        S = sum(counts), T = sum(counts[:i]), O = S - T, a = counts[i-1] + O,
        L_k / n_k = count / number of non-zero bins of level k,
        KL = (sum_{j<i-1} c_j log c_j + a log a
              - sum_k L_k log(L_k/n_k) - O log q_last) / S - log S + log T'
    with q_last = L_K/n_K for K the level of bin i-1 (or eps, and T' = T + eps,
    when that bin is empty). Measured per 2048-bin tensor: ~3 ms idle, ~7 ms on a
    loaded 2-core box (the loop reference in the tests: ~3 s for 2048 bins).
    """
    c = np.array(counts, dtype=np.int64)  # copy: the zero-spike edit must not leak
    nbins = c.size
    if nbins < 2:
        raise ValueError("entropy calibration needs at least 2 bins")
    if suppress_zero_spike:
        c[0] = c[1]
    m = int(num_quant_levels)
    first = max(1, min(int(start_bin), nbins))
    cand = np.arange(first, nbins + 1, dtype=np.int64)

    cf = c.astype(np.float64)
    total = float(c.sum())
    cum = np.concatenate([[0], np.cumsum(c)])  # exact int64 prefix sums
    nz_cum = np.concatenate([[0], np.cumsum(c > 0)])
    clogc = np.where(c > 0, cf * np.log(np.where(c > 0, cf, 1.0)), 0.0)
    clogc_cum = np.concatenate([[0.0], np.cumsum(clogc)])

    # Level k of candidate i covers bins [ceil(k*i/m), ceil((k+1)*i/m)).
    k = np.arange(m + 1, dtype=np.int64)
    bounds = (k[None, :] * cand[:, None] + m - 1) // m
    lvl_sum = (cum[bounds[:, 1:]] - cum[bounds[:, :-1]]).astype(np.float64)
    lvl_nz = (nz_cum[bounds[:, 1:]] - nz_cum[bounds[:, :-1]]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lvl_logq = np.where(lvl_sum > 0, np.log(lvl_sum / np.where(lvl_nz > 0, lvl_nz, 1.0)), 0.0)
    plogq_levels = (lvl_sum * lvl_logq).sum(axis=1)

    inside = cum[cand].astype(np.float64)  # T
    outliers = total - inside  # O
    last = c[cand - 1].astype(np.float64)
    a = last + outliers
    last_level = (m * (cand - 1)) // cand
    last_logq = lvl_logq[np.arange(cand.size), last_level]
    # Outliers folded into an empty last bin: Q is 0 there (see docstring).
    empty_last = (outliers > 0) & (last == 0)
    eps = float(empty_bin_eps)
    if eps > 0:
        last_logq = np.where(empty_last, math.log(eps), last_logq)
        q_total = inside + np.where(empty_last, eps, 0.0)
    else:
        q_total = inside

    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = clogc_cum[cand - 1] + np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)
        plogq = plogq_levels + outliers * last_logq
        kl = (plogp - plogq) / total - math.log(total) + np.log(q_total)
    invalid = inside <= 0
    if eps <= 0:
        invalid = invalid | empty_last
    kl = np.where(invalid, np.inf, kl)
    # Rounding can give -1e-16 for a perfect match; KL is non-negative.
    kl = np.maximum(kl, 0.0)
    return cand, kl


def entropy_amax(
    counts: np.ndarray,
    bin_width: float,
    num_quant_levels: int = 128,
    start_bin: int = 128,
    suppress_zero_spike: bool = True,
    empty_bin_eps: float = EMPTY_BIN_EPS,
    observed_max: float | None = None,
) -> float:
    """TensorRT entropy (KL) calibration; threshold ``(i + 0.5) * bin_width``.

    Picks the LAST candidate with minimal KL (largest threshold on ties, as
    pytorch-quantization). Capped at ``observed_max`` when given.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if bin_width <= 0 or counts.sum() == 0:
        return 0.0
    cand, kl = entropy_divergences(counts, num_quant_levels, start_bin, suppress_zero_spike, empty_bin_eps)
    if not np.isfinite(kl).any():  # cannot happen (i = nbins is finite); defensive
        return _cap(counts.size * bin_width, observed_max)
    best = cand.size - 1 - int(np.argmin(kl[::-1]))
    return _cap((int(cand[best]) + 0.5) * bin_width, observed_max)


def mse_errors(
    counts: np.ndarray, bin_width: float, start_bin: int = 128, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted squared fake-quantization error of the bin centres per candidate.

    Returns ``(candidate_amax, error)`` with ``candidate_amax = centres[i]`` for
    ``i >= start_bin``. Only non-zero bins enter the sum; candidates are processed
    in chunks to bound memory (chunk x non-zero-bins float64).
    """
    counts = np.asarray(counts, dtype=np.int64)
    nbins = counts.size
    centres = (np.arange(nbins, dtype=np.float64) + 0.5) * bin_width
    first = max(0, min(int(start_bin), nbins - 1))
    cand_amax = centres[first:]
    nz = counts > 0
    x = centres[nz]
    w = counts[nz].astype(np.float64)
    err = np.empty(cand_amax.size)
    for s in range(0, cand_amax.size, chunk):
        err[s : s + chunk] = _fake_quant_errors(x, w, cand_amax[s : s + chunk])
    return cand_amax, err


def _fake_quant_errors(x: np.ndarray, w: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """sum(w * (q(x) - x)^2) for each threshold in ``amax`` (symmetric int8, 127 levels)."""
    scale = INT8_LEVELS / amax[:, None]  # pytorch-quantization: round(x*scale) clamp, / scale
    q = np.clip(np.round(x[None, :] * scale), -INT8_LEVELS, INT8_LEVELS) / scale
    return ((q - x[None, :]) ** 2 * w[None, :]).sum(axis=1)


def quantization_error(counts: np.ndarray, bin_width: float, amax: float) -> float:
    """Weighted squared fake-quantization error of the bin centres at threshold ``amax`` (what :func:`mse_amax` minimises)."""
    counts = np.asarray(counts, dtype=np.int64)
    if amax <= 0 or bin_width <= 0:
        return 0.0
    nz = counts > 0
    x = (np.flatnonzero(nz) + 0.5) * bin_width
    return float(_fake_quant_errors(x, counts[nz].astype(np.float64), np.array([float(amax)]))[0])


CLIPPING_ERROR_RATIO = 0.5
""":func:`needs_clipping`: clipping must at least halve the quantization error."""


def needs_clipping(
    counts: np.ndarray, bin_width: float, clipped_amax: float, minmax: float, ratio: float = CLIPPING_ERROR_RATIO
) -> bool:
    """Whether a tensor needs clipping: the squared quantization error over its histogram at
    ``clipped_amax`` (e.g. the percentile amax) is below ``ratio`` x the error at min-max.

    The error is the MSE calibration's own criterion (:func:`quantization_error`), so
    the rule asks the arbiter the brief names: is the resolution that clipping wins
    worth the values it clips? A tensor with a long sparse tail (most SiLU outputs
    of YOLOv5n) gains several-fold; a compact one (uniform, post-ReLU of a
    normalised input) gains nothing or loses, and keeps its min-max range. The
    margin keeps min-max where clipping wins only marginally (a calibration set's
    percentile tail is itself noisy).
    """
    if clipped_amax <= 0 or minmax <= 0 or clipped_amax >= minmax:
        return False
    return quantization_error(counts, bin_width, clipped_amax) < ratio * quantization_error(counts, bin_width, minmax)


def mixed_amax(stats: TensorStatistics, percentile: float) -> float:
    """The percentile amax where the tensor :func:`needs_clipping`, else min-max."""
    minmax = minmax_amax(stats)
    clipped = percentile_amax(stats.counts, stats.bin_width, percentile, observed_max=minmax)
    return clipped if needs_clipping(stats.counts, stats.bin_width, clipped, minmax) else minmax


def mse_amax(
    counts: np.ndarray, bin_width: float, start_bin: int = 128, observed_max: float | None = None
) -> float:
    """amax minimising sum(counts * (q(c) - c)^2) over bin centres c (first argmin).

    Measured per 2048-bin tensor with ~1600 non-zero bins: ~8 ms idle, ~19 ms on
    a loaded 2-core box (cost scales with the number of non-zero bins).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if bin_width <= 0 or counts.sum() == 0:
        return 0.0
    cand_amax, err = mse_errors(counts, bin_width, start_bin)
    return _cap(float(cand_amax[int(np.argmin(err))]), observed_max)


def compute_amax(stats: TensorStatistics, choice: CalibrationChoice) -> float:
    """amax of one tensor for a trial's calibration choice (0.0 if no data)."""
    algorithm = CalibrationAlgorithm(choice.algorithm)
    observed = stats.amax
    if algorithm is CalibrationAlgorithm.MINMAX:
        return minmax_amax(stats)
    if algorithm is CalibrationAlgorithm.PERCENTILE:
        return percentile_amax(stats.counts, stats.bin_width, choice.percentile, observed_max=observed)
    if algorithm is CalibrationAlgorithm.ENTROPY:
        return entropy_amax(stats.counts, stats.bin_width, observed_max=observed)
    if algorithm is CalibrationAlgorithm.MSE:
        return mse_amax(stats.counts, stats.bin_width, observed_max=observed)
    if algorithm is CalibrationAlgorithm.MIXED:
        return mixed_amax(stats, choice.percentile)
    raise ValueError(f"unknown calibration algorithm {algorithm!r}")  # pragma: no cover


class ThresholdTable:
    """Memoised amax per (tensor, samples, algorithm[, percentile]).

    Built from :func:`~sensisearch.calibration.statistics.collect_statistics`
    output ``{sample_count: {tensor: TensorStatistics}}``. A requested sample
    count above every available one resolves to the largest (the calibration data
    was smaller than asked, see ``collect_statistics``); any other count that was
    not collected is a programming error (ValueError).
    """

    def __init__(self, statistics: Mapping[int, Mapping[str, TensorStatistics]]) -> None:
        if not statistics:
            raise ValueError("ThresholdTable needs statistics for at least one sample count")
        self._stats = {int(k): dict(v) for k, v in statistics.items()}
        self._cache: dict[tuple[str, int, CalibrationAlgorithm, float | None], float] = {}

    @property
    def sample_counts(self) -> list[int]:
        return sorted(self._stats)

    def resolve_samples(self, samples: int) -> int:
        if samples in self._stats:
            return samples
        largest = max(self._stats)
        if samples > largest:
            return largest
        raise ValueError(f"no statistics collected for {samples} samples (have {self.sample_counts})")

    def statistics(self, tensor: str, samples: int) -> TensorStatistics:
        per_tensor = self._stats[self.resolve_samples(samples)]
        if tensor not in per_tensor:
            raise KeyError(f"no statistics for tensor {tensor!r}")
        return per_tensor[tensor]

    def amax(
        self,
        tensor: str,
        samples: int,
        algorithm: CalibrationAlgorithm | str,
        percentile: float = 99.99,
    ) -> float:
        algorithm = CalibrationAlgorithm(algorithm)
        resolved = self.resolve_samples(samples)
        key = (tensor, resolved, algorithm, float(percentile) if algorithm.reads_percentile else None)
        cached = self._cache.get(key)
        if cached is None:
            choice = CalibrationChoice(algorithm=algorithm, samples=resolved, percentile=float(percentile))
            cached = compute_amax(self.statistics(tensor, resolved), choice)
            self._cache[key] = cached
            logger.debug("amax %s samples=%d %s = %.6g", tensor, resolved, algorithm.value, cached)
        return cached

    def amaxes(self, choice: CalibrationChoice, tensors: Sequence[str] | None = None) -> dict[str, float]:
        """amax of every (or the given) tensor for a trial's calibration choice."""
        names = tensors if tensors is not None else list(self._stats[self.resolve_samples(choice.samples)])
        return {t: self.amax(t, choice.samples, choice.algorithm, choice.percentile) for t in names}
