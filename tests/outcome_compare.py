"""Field-by-field comparison of two :class:`TrialOutcome` objects (shared by the outcome-file and isolation tests)."""

from __future__ import annotations

import dataclasses

import numpy as np

from sensisearch.evaluation.base import EvaluationResult
from sensisearch.study.trial._pipeline import TrialOutcome

_MATCH_FIELDS = ("image_ids", "category_ids", "det_image", "det_category", "det_score", "det_matched", "det_ignore", "gt_counts")


def assert_same_outcome(got: TrialOutcome, expected: TrialOutcome) -> None:
    """Field by field; the per-image arrays by value and dtype."""
    for f in dataclasses.fields(TrialOutcome):
        a, b = getattr(got, f.name), getattr(expected, f.name)
        if f.name != "evaluation":
            assert a == b, f.name
            continue
        for g in dataclasses.fields(EvaluationResult):
            x, y = getattr(a, g.name), getattr(b, g.name)
            if g.name != "per_image" or y is None:
                assert x == y or repr(x) == repr(y), f"evaluation.{g.name}"  # repr: NaN scores are equal
            elif isinstance(y, np.ndarray):
                assert isinstance(x, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y), "evaluation.per_image"
            else:
                for name in _MATCH_FIELDS:
                    assert np.array_equal(getattr(x, name), getattr(y, name)), f"evaluation.per_image.{name}"
