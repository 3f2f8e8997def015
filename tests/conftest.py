"""Shared fixtures.

Real data lives outside the repo: ``SENSISEARCH_SHARED_DATA`` (default
``<repo>/../shared/data``). Tests that need it skip with the reason when it is
missing, so a user's checkout without it still runs the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("SENSISEARCH_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def require_shared(*parts: str) -> Path:
    """Path inside the shared data folder, or skip the test saying what is missing."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: set SENSISEARCH_SHARED_DATA to the shared/data folder (see README)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return require_shared("mnist")


@pytest.fixture(scope="session")
def yolo_model() -> Path:
    return require_shared("yolov5n.onnx")


@pytest.fixture(scope="session")
def coco_dev() -> Path:
    return require_shared("coco-dev")
