"""Where calibration batches come from: a fingerprint, a size and a batch iterator in a given order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class CalibrationSource:
    """Calibration inputs: ``size`` samples, served as preprocessed batches in a given order."""

    fingerprint: str
    size: int
    input_name: str
    batches: Callable[[Sequence[int], int], Iterator[np.ndarray]]
    static_batch: int | None = None
