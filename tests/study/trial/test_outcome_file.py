"""The trial child's outcome file: data only (JSON + an ``.npz``), read back exactly, anything else refused.

A trial child hands its :class:`TrialOutcome` to the worker through files in the
trial folder, which may sit on a shared file system; these tests build outcomes by
hand (every optional part set) and tamper with the files. The real digits trial
through the trial server is in ``tests/test_isolation.py``.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from sensisearch.backends.base import BuildResult, LatencyStats
from sensisearch.evaluation.base import EvaluationResult
from sensisearch.measure import PairedLatency
from sensisearch.measure._machine import MachineLoad
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.quantize.ranges import TensorRange
from sensisearch.study.trial._fidelity import StopDecision, SubsetFigures
from sensisearch.study.trial._isolation import RESULT_NAME, TrialProcessError, load_outcome, save_outcome
from sensisearch.study.trial._pipeline import TrialOutcome

from outcome_compare import assert_same_outcome  # tests/ is on sys.path (its conftest.py)


def _outcome(tmp_path: Path, *, full: bool = True) -> TrialOutcome:
    config = TrialConfig({"conv1": Precision.INT8, "fc": Precision.FP16},
                         CalibrationChoice(CalibrationAlgorithm.PERCENTILE, 64, 99.9))
    paired = PairedLatency(1.7, (1.6, 1.81), 0.05, 0.4, 0.68, 0.45, 0.7, 21, 0.9, "ci", (0.41, 0.4, 0.39),
                           MachineLoad(3.5, 0.01, 2))
    return TrialOutcome(
        config=config,
        deployable=tmp_path / "deployable.onnx",
        build=BuildResult(tmp_path / "model.onnx", 0.25, {"int8": 1, "fp16": 1}, {"ort_version": "1.19", "nodes": 7}),
        latency=LatencyStats(0.4, 0.45, 0.41, 0.39, 21, 1),
        evaluation=EvaluationResult("top1", {"top1": 97.5, "top5": 100.0}, 400, {"0": 98.0, "1": float("nan")},
                                    {"inference": 0.5}, np.array([True, False, True]), {"0": 40, "1": 38}),
        timings={"build": 0.25, "evaluate": 0.6},
        ranges={"x": TensorRange(2.5, False, -1.25), "relu": TensorRange(3.0, True)},
        paired=paired if full else None,
        latency_record={"median_ms": 0.39, "speedup_ci95": [1.6, 1.81], "load": {"load_avg_1m": 3.5}} if full else None,
        timing_facts={"gpu_clock_mhz": 1410} if full else {},
        subset=SubsetFigures(100, 400, 95.0, 97.0, 2.0, (1.0, 3.5), 0.2) if full else None,
        early_stop=StopDecision("dominated", "trial 3 is faster", 3) if full else None,
    )


@pytest.mark.parametrize("full", [True, False])
def test_an_outcome_reads_back_field_by_field(tmp_path: Path, full: bool) -> None:
    outcome = _outcome(tmp_path, full=full)
    save_outcome(outcome, tmp_path / RESULT_NAME)
    assert_same_outcome(load_outcome(tmp_path / RESULT_NAME), outcome)


def test_a_pickle_in_place_of_the_outcome_is_refused_unread(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / RESULT_NAME
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(TrialProcessError) as caught:
        load_outcome(path)
    assert not (tmp_path / "pwned").exists()
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    # What the file would have done to a worker that unpickles its trials' outcomes:
    pickle.loads(path.read_bytes())  # noqa: S301 - the point of the test
    assert (tmp_path / "pwned").exists()


def test_a_pickled_per_image_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / RESULT_NAME
    save_outcome(_outcome(tmp_path), path)
    npz = path.with_suffix(".npz")
    np.savez(npz, correct=np.array([{"not": "data"}], dtype=object))  # an object array needs pickle to load
    with pytest.raises(TrialProcessError) as caught:
        load_outcome(path)
    assert str(npz) in str(caught.value) and "\n" not in str(caught.value)


def _tampered(tmp_path: Path, change) -> str:  # noqa: ANN001
    path = tmp_path / RESULT_NAME
    save_outcome(_outcome(tmp_path), path)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(TrialProcessError) as caught:
        load_outcome(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: not a trial outcome") and "\n" not in text
    return text


def test_an_unknown_key_is_refused(tmp_path: Path) -> None:
    assert "unknown key build.post_install" in _tampered(tmp_path, lambda d: d["build"].update(post_install="curl | sh"))
    assert "unknown key extra" in _tampered(tmp_path, lambda d: d.update(extra=1))


def test_a_value_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    assert "latency.median_ms" in _tampered(tmp_path, lambda d: d["latency"].update(median_ms="0.4"))
    assert "evaluation.count" in _tampered(tmp_path, lambda d: d["evaluation"].update(count=399.5))
    assert "early_stop.dominated_by" in _tampered(tmp_path, lambda d: d["early_stop"].update(dominated_by=True))


def test_another_format_or_a_missing_part_is_refused(tmp_path: Path) -> None:
    _tampered(tmp_path, lambda d: d.update(format="something-else/1"))
    _tampered(tmp_path, lambda d: d.pop("config"))
    _tampered(tmp_path, lambda d: d.update(config=[1, 2]))
