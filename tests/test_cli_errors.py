"""Bad input: a one-line error naming the file or flag, non-zero exit, nothing lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
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
