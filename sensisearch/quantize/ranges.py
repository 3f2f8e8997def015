"""The calibrated range of one activation tensor, as the emitter consumes it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorRange:
    """Clipping threshold of one activation tensor.

    ``amax`` is the positive threshold (scale = amax/127 for int8, amax/255 for
    uint8); ``nonnegative`` is True when the calibrated minimum is >= 0 (e.g. a
    post-ReLU tensor), which lets profiles with ``unsigned_nonnegative_activations``
    use uint8.
    """

    amax: float
    nonnegative: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.amax) or self.amax < 0:
            raise ValueError(f"TensorRange.amax must be finite and >= 0, got {self.amax!r}")
