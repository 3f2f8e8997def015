"""Names, shapes and dtypes of graph inputs and outputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output.

    ``shape`` holds ints for static dimensions and ``None`` for symbolic or
    unknown ones (e.g. a dynamic batch).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def static_batch(self) -> int | None:
        """The fixed batch size, or None when the batch dimension is dynamic."""
        return self.shape[0] if self.shape else None
