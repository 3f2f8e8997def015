"""The study: settings, search space, per-trial pipeline, Optuna runner, results."""

# Study storage (issue 12): safe opening and credential masking.
from sensisearch.study._storage import mask_url, open_storage

__all__ = [
    "mask_url",
    "open_storage",
]
