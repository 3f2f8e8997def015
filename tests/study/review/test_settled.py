"""A verified figure is settled when it is narrow and another timing taken at another time agrees with it
(pure selection logic over tournament entries built from per-round ratios)."""

from __future__ import annotations

import numpy as np

from sensisearch.measure import PairedLatency
from sensisearch.study.review._verify import SETTLED_CI_WIDTH, settle, unsettled
from sensisearch.study.store._timing import PairedTiming, Verification


def verification(ratios: np.ndarray) -> Verification:
    """A tournament entry from per-round ratios: median and a percentile bootstrap CI computed here with numpy."""
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(ratios, size=(2000, ratios.size)), axis=1)
    lo, hi = np.percentile(medians, [2.5, 97.5])
    paired = PairedLatency(
        speedup=float(np.median(ratios)), speedup_ci95=(float(lo), float(hi)), ratio_iqr=0.0, candidate_median_ms=10.0,
        reference_median_ms=16.0, candidate_p90_ms=11.0, reference_p90_ms=17.0, rounds=ratios.size, seconds=1.0,
        stopped_by="max_seconds", candidate_times_ms=(),
    )
    return Verification(PairedTiming.of(paired, {}, median_ms=10.0, backend="onnxruntime"))


rng = np.random.default_rng(1)
QUIET = verification(rng.normal(1.60, 0.01, 80))
AGAIN = verification(rng.normal(1.59, 0.01, 80))
# A minute in which INT8 runs 15% slower relative to FP32, for the whole timing: narrow, and wrong.
SLOW_MINUTE = verification(rng.normal(1.36, 0.01, 80))
# A timing straddling such a minute's edge: half the rounds slow, which moves the median and widens the CI.
STRADDLING = verification(np.concatenate([rng.normal(1.60, 0.01, 40), rng.normal(1.36, 0.03, 40)]))


def test_the_fixtures_are_what_they_claim() -> None:
    assert max(QUIET.timing.relative_ci_width, SLOW_MINUTE.timing.relative_ci_width) < SETTLED_CI_WIDTH
    assert STRADDLING.timing.relative_ci_width > SETTLED_CI_WIDTH


def test_a_narrow_timing_that_the_in_study_figure_confirms_is_settled_at_once() -> None:
    assert settle([QUIET], in_study=1.62) == (QUIET, True)


def test_a_narrow_timing_inside_a_slow_minute_is_not_settled_until_another_agrees() -> None:
    kept, settled = settle([SLOW_MINUTE], in_study=1.60)
    assert kept is SLOW_MINUTE and not settled  # the only timing, but nothing confirms it
    kept, settled = settle([SLOW_MINUTE, QUIET], in_study=1.60)
    assert kept is QUIET and settled  # two of three figures agree; the slow minute is outvoted
    # Without an in-study figure, two verify timings must agree.
    assert settle([SLOW_MINUTE, QUIET], in_study=None)[1] is False
    assert settle([SLOW_MINUTE, QUIET, AGAIN], in_study=None)[0] in (QUIET, AGAIN)
    assert settle([SLOW_MINUTE, QUIET, AGAIN], in_study=None)[1] is True


def test_a_wide_timing_is_never_kept_over_a_narrow_one_and_never_settled() -> None:
    assert settle([STRADDLING], in_study=1.5) == (STRADDLING, False)
    assert settle([STRADDLING, QUIET], in_study=None)[0] is QUIET


def test_unsettled_names_the_trials_to_time_again() -> None:
    histories = {0: [verification(np.ones(40))], 3: [QUIET], 7: [SLOW_MINUTE], 9: [STRADDLING]}
    assert unsettled(histories, {0: 1.0, 3: 1.61, 7: 1.60, 9: 1.58}) == [7, 9]
