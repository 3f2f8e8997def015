"""Classification data loading and Top-1 on a real model someone else trained."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.errors import SensisearchError
from sensisearch.evaluation.classification import ClassificationEvaluator, topk_correct
from sensisearch.evaluation.datasets import Preprocess, load_images
from sensisearch.model.tensor import TensorSpec

MNIST_SPEC = TensorSpec("input", (None, 1, 28, 28), np.dtype(np.float32))


def test_topk_against_sort_reference() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 500)
    for k in (1, 3, 5):
        order = np.argsort(-logits, axis=1)[:, :k]
        expected = sum(int(labels[i] in order[i]) for i in range(500))
        assert topk_correct(logits, labels, k) == expected


def test_mnist_fp32_top1_matches_reference(mnist_dir: Path, tmp_path: Path) -> None:
    """shared/data/mnist/README.md: FP32 Top-1 on the dev part is 0.9901 (66 errors of 6,667)."""
    backend = OnnxRuntimeBackend()
    build = backend.build(mnist_dir / "mnist_cnn.onnx", tmp_path)
    data = load_images(mnist_dir, MNIST_SPEC, "--eval-data")
    assert len(data) == 6667
    with backend.load(build.artifact) as runner:
        result = ClassificationEvaluator(data, Preprocess((0.5,), (0.5,)), "input", 512).evaluate(runner)
    errors = round(6667 * (1 - result.metrics["top1"] / 100))
    assert errors == 66
    assert round(result.metrics["top1"] / 100, 4) == 0.9901


def test_npz_and_image_folder_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 1, 0])
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    folder = tmp_path / "folder"
    for i, (img, lab) in enumerate(zip(images, labels)):
        (folder / f"class{lab}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"class{lab}" / f"{i}.png"), img)
    a = load_images(tmp_path / "d.npz", MNIST_SPEC, "--eval-data")
    b = load_images(folder, MNIST_SPEC, "--eval-data")
    assert b.class_names == ["class0", "class1"]
    # Same multiset of (image, label) pairs: PNG is lossless.
    key = lambda imgs, labs: sorted((int(l), im.tobytes()) for im, l in zip(imgs, labs))  # noqa: E731
    assert key(a.images, a.labels) == key(b.images, b.labels)


def test_preprocess_matches_formula() -> None:
    x = np.array([[[[0], [255]], [[128], [64]]]], dtype=np.uint8)  # NHWC 1x2x2x1
    out = Preprocess((0.5,), (0.5,)).apply(x)
    assert out.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(out[0, 0], (np.array([[0, 255], [128, 64]]) / 255 - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "no such file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no images found"),
        (lambda p: np.savez(p / "s.npz", images=np.zeros((3, 32, 32), np.uint8), labels=np.zeros(3)) or p / "s.npz", "expects 1x28x28"),
        (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "expected a directory or an .npz"),
    ],
)
def test_bad_data_is_one_line_error(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(SensisearchError) as err:
        load_images(path, MNIST_SPEC, "--eval-data")
    assert message in str(err.value)
    assert "\n" not in str(err.value)
