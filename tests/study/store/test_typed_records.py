"""Typed record parts read exactly what earlier versions stored, and write it back key for key.

``tests/data/legacy_study/study.db`` was made by the previous release; it is only
ever opened as a copy, so no test can change it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest

from sensisearch.quantize.config import TrialConfig
from sensisearch.study.store._record import (
    TrialRecord,
    prediction_check_attrs,
    read_prediction_check,
    read_verified,
    verified_attrs,
)
from sensisearch.study.store._timing import PairedTiming, PredictionCheck, Verification

LEGACY = Path(__file__).resolve().parents[2] / "data" / "legacy_study" / "study.db"
TYPED = ("config", "paired", "verified")


def _dumped(value: Any) -> str:
    """The JSON Optuna stores for a user attribute (key order matters: files are compared byte for byte)."""
    return json.dumps(value)


@pytest.fixture()
def legacy(tmp_path: Path) -> optuna.Study:
    copy = tmp_path / "study.db"
    shutil.copyfile(LEGACY, copy)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{copy}"
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def test_legacy_trials_read_back_typed_and_write_back_the_same_json(legacy: optuna.Study) -> None:
    trials = legacy.get_trials(deepcopy=False)
    assert trials and all("paired" in t.user_attrs and "config" in t.user_attrs for t in trials)
    for trial in trials:
        raw = trial.user_attrs
        record = TrialRecord.from_trial(trial, legacy.user_attrs)
        # The typed parts say what the raw attributes say.
        assert record.config == TrialConfig.from_dict(raw["config"])
        assert record.precisions == raw["config"]["precisions"]
        assert list(record.precisions) == list(raw["config"]["precisions"])  # graph order kept
        paired = raw["paired"]
        assert record.paired is not None
        assert record.paired.speedup == paired["speedup"] and list(record.paired.speedup_ci95) == paired["speedup_ci95"]
        assert record.paired.candidate_times_ms == tuple(paired["candidate_times_ms"])
        assert record.paired.rounds == paired["rounds"] and record.paired.stopped_by == paired["stopped_by"]
        assert record.paired.facts == paired["facts"] and record.paired.load is not None
        assert record.paired.load.to_dict() == paired["load"]
        assert record.paired.median_ms is None and record.paired.backend is None
        assert record.verified is None and not record.is_verified  # this study never ran the tournament
        # Written back: the same attributes, each the same JSON.
        attrs = record.to_attrs()
        assert set(attrs) == set(raw)
        for key in raw:
            assert _dumped(attrs[key]) == _dumped(raw[key]), key
        assert _dumped(record.paired.to_dict()) == _dumped(paired)
        assert _dumped(record.config.to_dict()) == _dumped(raw["config"])  # type: ignore[union-attr]


def test_legacy_pareto_entries_match_what_the_raw_attributes_give(legacy: optuna.Study) -> None:
    # pareto.json's latency and config as the record wrote them before its parts were typed.
    for trial in legacy.get_trials(deepcopy=False):
        raw = trial.user_attrs
        entry = TrialRecord.from_trial(trial, legacy.user_attrs).to_dict(93.7)
        summary = {k: v for k, v in raw["paired"].items() if k != "candidate_times_ms"}
        assert _dumped(entry["latency"]) == _dumped({**raw["latency"], "paired": summary})
        assert _dumped(entry["config"]) == _dumped(raw["config"])
        assert entry["speedup"] == raw["paired"]["speedup"] and entry["speedup_source"] == "paired"


def _old_verified_entry(paired: dict[str, Any], median_ms: float, drop: list[float] | None) -> dict[str, Any]:
    """One tournament entry exactly as the verify step wrote it before its record was typed."""
    measured = {k: v for k, v in paired.items() if k != "facts"}  # PairedLatency.to_dict()
    timing = {**measured, "median_ms": median_ms, "facts": {"gpu_clock_mhz": 1980}, "backend": "onnxruntime"}
    return {"timing": timing, "drop_ci95": drop}


def test_verified_study_attribute_reads_typed_and_writes_back_the_same_json(legacy: optuna.Study) -> None:
    trials = legacy.get_trials(deepcopy=False)
    stored = {
        str(t.number): _old_verified_entry(t.user_attrs["paired"], 0.5 + t.number, None if t.number == 0 else [-0.2, 0.4])
        for t in trials
    }
    legacy.set_user_attr("verified_trials", stored)
    entries = read_verified(legacy.user_attrs)
    assert sorted(entries) == [t.number for t in trials]
    for trial in trials:
        entry = entries[trial.number]
        raw = stored[str(trial.number)]
        assert entry.timing.median_ms == raw["timing"]["median_ms"] and entry.timing.backend == "onnxruntime"
        assert entry.timing.facts == {"gpu_clock_mhz": 1980}
        assert entry.drop_ci95 == (None if raw["drop_ci95"] is None else tuple(raw["drop_ci95"]))
        assert _dumped(entry.to_dict()) == _dumped(raw)
        record = TrialRecord.from_trial(trial, legacy.user_attrs)
        assert record.verified == entry.timing and record.is_verified and record.speedup_source == "verified"
        assert record.median_ms == raw["timing"]["median_ms"] and record.in_study_ms == trial.user_attrs["latency"]["median_ms"]
        # The tournament's drop CI replaces the trial's own when it computed one.
        expected = raw["drop_ci95"] or trial.user_attrs["drop_ci95"]
        assert record.drop_ci == (expected[0], expected[1])
    # verified_attrs writes the attribute back as it was read.
    (value,) = verified_attrs(entries).values()
    assert _dumped(value) == _dumped(stored)


def test_prediction_check_round_trips_exactly() -> None:
    stored = {"backend": "tensorrt", "source": "estimate", "spearman": 0.8, "n": 2,
              "trials": [{"number": 2, "in_study_speedup": 1.5, "verified_speedup": 1.4},
                         {"number": 3, "in_study_speedup": 2.0, "verified_speedup": 2.25}]}
    check = read_prediction_check({"prediction_check": stored})
    assert check == PredictionCheck("tensorrt", "estimate", 0.8, ((2, 1.5, 1.4), (3, 2.0, 2.25)))
    assert _dumped(prediction_check_attrs(check)["prediction_check"]) == _dumped(stored)
    assert read_prediction_check({}) is None
    assert "predicted vs verified" in check.summary()


def test_parts_at_their_default_are_not_written_and_empty_ones_read_as_none() -> None:
    assert TrialRecord(1, error="x").to_attrs() == {"error": "x"}
    # An empty part ({}) is how an older record said "none".
    record = TrialRecord.from_attrs(1, {"paired": {}, "verified": {}, "config": {}})
    assert (record.paired, record.verified, record.config) == (None, None, None)
    assert record.timing is None and record.speedup is None and record.latency_source == "unpaired"
    assert record.requested_counts() == {"int8": 0, "fp16": 0, "fp32": 0} and record.calibration_text == ""
    assert record.to_dict(None)["config"] == {} and record.to_dict(None)["latency"] == {"paired": {}}


def test_paired_timing_keeps_what_is_stored_beside_the_measurement(legacy: optuna.Study) -> None:
    raw = legacy.get_trials(deepcopy=False)[1].user_attrs["paired"]
    timing = PairedTiming.from_dict(raw)
    again = PairedTiming.of(timing, timing.facts)
    assert again == timing and _dumped(again.to_dict()) == _dumped(raw)
    assert "candidate_times_ms" not in timing.summary_dict() and "facts" in timing.summary_dict()
    # Without facts nothing is invented: an entry that never had them writes none.
    bare = {k: v for k, v in raw.items() if k != "facts"}
    assert _dumped(PairedTiming.from_dict(bare).to_dict()) == _dumped(bare)
    assert Verification.from_dict({"timing": raw, "drop_ci95": None}).drop_ci95 is None
