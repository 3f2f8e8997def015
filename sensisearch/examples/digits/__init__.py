"""Bundled example ``--example digits``: a small ResNet on scikit-learn's handwritten digits.

Files: ``digits_resnet.onnx`` (FP32), ``calib.npz``, ``eval.npz``, ``example.json``.
``train.py`` regenerates them and needs torch (a dev/train-only dependency); importing
this package does not import torch.
"""

from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parent
MODEL_PATH = EXAMPLE_DIR / "digits_resnet.onnx"
CALIB_PATH = EXAMPLE_DIR / "calib.npz"
EVAL_PATH = EXAMPLE_DIR / "eval.npz"
META_PATH = EXAMPLE_DIR / "example.json"
