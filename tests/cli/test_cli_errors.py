"""Bad input: a one-line error naming the file or flag, non-zero exit, nothing lost."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sensisearch.examples import load_example
from sensisearch.onnx_compat import make_model


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sensisearch", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "120"},
    )


def _no_layer_model(path: Path) -> Path:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 32, 32])],
    )
    onnx.save(make_model(graph, opset=13), path)
    return path


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    example = load_example("digits")
    (tmp / "not.onnx").write_text("this is not a model")
    (tmp / "empty").mkdir()
    np.savez(tmp / "wrong.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.int64))
    model = str(example.model)
    return [
        (["--model", str(tmp / "missing.onnx"), "--eval-data", str(example.eval_data)], "missing.onnx"),
        (["--model", str(tmp / "not.onnx"), "--eval-data", str(example.eval_data)], "not.onnx"),
        (["--model", str(_no_layer_model(tmp / "relu.onnx")), "--eval-data", str(example.eval_data)], "relu.onnx"),
        (["--model", model, "--eval-data", str(tmp / "empty")], "empty"),
        (["--model", model, "--eval-data", str(tmp / "wrong.npz")], "wrong.npz"),
        (["--example", "digits", "--budget", "0"], "--budget"),
        (["--example", "digits", "--budget", "-3"], "--budget"),
        (["--example", "digits", "--holdout", "2.5"], "--holdout 2.5"),
        (["--example", "digits", "--holdout", "5000"], "--holdout 5000"),  # more than the 2000 images
    ]


def test_each_bad_input_is_one_line_and_nonzero(tmp_path: Path) -> None:
    for args, must_name in _cases(tmp_path):
        out = tmp_path / "out"
        result = _cli("run", *args, "--out", str(out), cwd=tmp_path)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        error_lines = [line for line in lines if line.startswith("error:")]
        assert result.returncode == 2, (args, result.stderr)
        assert len(error_lines) == 1 and "Traceback" not in result.stderr, (args, result.stderr)
        assert must_name in error_lines[0], (args, error_lines)


@pytest.mark.slow  # a real two-trial study first
def test_failed_start_keeps_an_existing_study(tmp_path: Path) -> None:
    """A bad re-run must not touch the study already on disk."""
    out = tmp_path / "out"
    ok = _cli("run", "--example", "digits", "--budget", "2", "--out", str(out), "--latency-seconds", "0.1",
              "--sample-counts", "64", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    db = (out / "study.db").read_bytes()
    bad = _cli("run", "--example", "digits", "--budget", "3", "--out", str(out), "--eval-data", str(tmp_path / "nope"), cwd=tmp_path)
    assert bad.returncode == 2
    assert (out / "study.db").read_bytes() == db
    assert (out / "winner" / "config.json").is_file()


def _damaged_files(tmp: Path) -> list[tuple[list[str], str, str]]:
    """(flags, file the line must name, words it must say) for files that are empty, cut or corrupt."""
    example = load_example("digits")
    inputs = np.random.default_rng(0).random((8, 1, 32, 32), dtype=np.float32)
    np.save(tmp / "ok.npy", inputs)
    whole_npy = (tmp / "ok.npy").read_bytes()
    (tmp / "empty.npy").write_bytes(b"")
    (tmp / "cut.npy").write_bytes(whole_npy[: len(whole_npy) // 2])
    np.savez(tmp / "ok.npz", input=inputs)
    whole_npz = (tmp / "ok.npz").read_bytes()
    (tmp / "empty.npz").write_bytes(b"")
    (tmp / "cut.npz").write_bytes(whole_npz[: len(whole_npz) // 2])
    # Directory intact, member data flipped: only reading the array (its CRC) finds it.
    flipped = bytearray(whole_npz)
    flipped[200:260] = bytes(255 - b for b in flipped[200:260])
    (tmp / "crc.npz").write_bytes(bytes(flipped))
    np.savez_compressed(tmp / "packed.npz", input=inputs)
    packed = bytearray((tmp / "packed.npz").read_bytes())
    packed[100:200] = bytes(range(100))
    (tmp / "inflate.npz").write_bytes(bytes(packed))
    with zipfile.ZipFile(tmp / "raw.npz", "w") as archive:  # a member without the .npy header
        archive.writestr("input.npy", b"not an array")
    model_bytes = example.model.read_bytes()
    (tmp / "cut.onnx").write_bytes(model_bytes[: len(model_bytes) // 2])
    newer = onnx.load(str(example.model))
    newer.ir_version = 99
    onnx.save(newer, tmp / "ir99.onnx")
    (tmp / "images").mkdir()
    (tmp / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp / "idx").mkdir()
    (tmp / "idx" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(4000))[:60])
    (tmp / "no-images").mkdir()
    (tmp / "no-images" / "notes.txt").write_text("no images here")
    calib = ["--example", "digits", "--calib-data"]
    return [
        ([*calib, str(tmp / "empty.npy")], "empty.npy", "numpy.save"),
        ([*calib, str(tmp / "cut.npy")], "cut.npy", "numpy.save"),
        ([*calib, str(tmp / "empty.npz")], "empty.npz", "numpy.savez"),
        ([*calib, str(tmp / "cut.npz")], "cut.npz", "numpy.savez"),
        ([*calib, str(tmp / "crc.npz")], "crc.npz", "numpy.savez"),
        ([*calib, str(tmp / "inflate.npz")], "inflate.npz", "numpy.savez"),
        ([*calib, str(tmp / "raw.npz")], "raw.npz", "numpy.savez"),
        ([*calib, str(tmp / "images")], "broken.png", "cannot decode"),
        ([*calib, str(tmp / "no-images")], "no-images", "no images"),
        (["--example", "digits", "--eval-data", str(tmp / "idx")], "t10k-images-idx3-ubyte.gz", "idx"),
        (["--model", str(tmp / "cut.onnx"), "--eval-data", str(example.eval_data)], "cut.onnx", "not an ONNX model"),
        (["--model", str(tmp / "ir99.onnx"), "--eval-data", str(example.eval_data)], "ir99.onnx", "IR version 99"),
    ]


@pytest.mark.slow  # whole CLI processes, run in the main suite; the lowest-versions step skips them
def test_each_damaged_file_is_one_line_and_nonzero(tmp_path: Path) -> None:
    for args, must_name, must_say in _damaged_files(tmp_path):
        result = _cli("run", *args, "--budget", "1", "--out", str(tmp_path / "out"), cwd=tmp_path)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (args, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, result.stderr)
        assert "internal error" not in lines[0], (args, lines)
        assert must_name in lines[0] and must_say in lines[0], (args, lines)
