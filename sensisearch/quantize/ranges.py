"""The calibrated range of one activation tensor, as the emitter consumes it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TensorRange:
    """Clipping threshold of one activation tensor.

    ``amax`` is the positive threshold (scale = amax/127 for int8, amax/255 for
    uint8); ``nonnegative`` is True when the calibrated minimum is >= 0 (e.g. a
    post-ReLU tensor), which lets profiles with ``unsigned_nonnegative_activations``
    use uint8.

    ``min`` is the optional calibrated minimum (<= 0 for a tensor that can be
    negative). Profiles with ``asymmetric_signed_activations`` (ONNX Runtime)
    quantize a signed tensor over ``[lower, amax]`` (see :attr:`lower`) instead of
    ``[-amax, amax]``; symmetric profiles (TensorRT) ignore it. ``None`` (ranges
    recorded before the field existed) means "unknown": the symmetric range.
    """

    amax: float
    nonnegative: bool = False
    min: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.amax) or self.amax < 0:
            raise ValueError(f"TensorRange.amax must be finite and >= 0, got {self.amax!r}")
        if self.min is not None and not math.isfinite(self.min):
            raise ValueError(f"TensorRange.min must be finite or None, got {self.min!r}")

    @property
    def lower(self) -> float:
        """Lower end of the asymmetric range: ``min`` clipped to ``[-amax, 0]``.

        The calibration algorithms derive ``amax`` from |x|, so their clipping
        applies to the negative side too; 0 always stays inside the range. Without
        ``min`` this is ``-amax`` (symmetric).
        """
        if self.min is None:
            return -self.amax
        return min(0.0, max(float(self.min), -self.amax))


def ranges_to_dict(ranges: dict[str, TensorRange]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, r in ranges.items():
        entry: dict[str, Any] = {"amax": r.amax, "nonnegative": r.nonnegative}
        if r.min is not None:
            entry["min"] = r.min
        out[name] = entry
    return out


def ranges_from_dict(data: dict[str, Any]) -> dict[str, TensorRange]:
    """Inverse of :func:`ranges_to_dict`; dicts written before ``min`` existed give ``min=None``."""
    return {
        name: TensorRange(
            amax=float(v["amax"]),
            nonnegative=bool(v["nonnegative"]),
            min=None if v.get("min") is None else float(v["min"]),
        )
        for name, v in data.items()
    }
