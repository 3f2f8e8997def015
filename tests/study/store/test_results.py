"""Pareto front and winner selection, checked against Optuna's own front."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from sensisearch.study.store._results import choose_winner, pareto_front, records
from sensisearch.study.config._settings import merge_settings
from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import TrialConfig
from conftest import REPO


def _study(points: list[tuple[float, float]], baselines: dict[int, str] | None = None) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i, (acc, ms) in enumerate(points):
        attrs = {"latency": {"median_ms": ms, "p90_ms": ms}, "metric": "top1", "config": {"precisions": {}, "calibration": {"algorithm": "minmax", "samples": 64, "percentile": 99.99}}}
        if baselines and i in baselines:
            attrs["baseline"] = baselines[i]
        study.add_trial(optuna.trial.create_trial(values=[acc, ms], user_attrs=attrs))
    return study


def test_pareto_front_equals_optuna_best_trials() -> None:
    rng = np.random.default_rng(3)
    points = [(float(a), float(m)) for a, m in zip(rng.integers(90, 100, 60), rng.integers(1, 20, 60))]
    study = _study(points)
    ours = sorted(r.number for r in pareto_front(records(study)))
    theirs = sorted(t.number for t in study.best_trials)
    assert ours == theirs


def test_infeasible_trials_never_enter_front_or_win() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    base = {"config": {"precisions": {}, "calibration": {"algorithm": "minmax", "samples": 64, "percentile": 99.99}}, "metric": "top1"}
    study.add_trial(optuna.trial.create_trial(values=[99.0, 10.0], user_attrs={**base, "baseline": "fp32", "latency": {"median_ms": 10.0}}))
    # Fastest and accurate, but violates a constraint (e.g. a class collapsed).
    study.add_trial(optuna.trial.create_trial(
        values=[98.9, 1.0], user_attrs={**base, "latency": {"median_ms": 1.0}}, system_attrs={"constraints:class_drop": 3.0}
    ))
    study.add_trial(optuna.trial.create_trial(values=[98.5, 5.0], user_attrs={**base, "latency": {"median_ms": 5.0}}))
    recs = records(study)
    assert 1 not in [r.number for r in pareto_front(recs)]
    assert choose_winner(recs, max_drop=1.0).record.number == 2


def test_winner_fastest_within_drop_else_best_effort() -> None:
    # trial 0 = FP32 baseline 99.0 @ 10 ms; 1 = 98.5 @ 4 ms; 2 = 97.0 @ 2 ms; 3 = 98.9 @ 6 ms
    study = _study([(99.0, 10.0), (98.5, 4.0), (97.0, 2.0), (98.9, 6.0)], {0: "fp32"})
    choice = choose_winner(records(study), max_drop=1.0)
    assert choice.qualified and choice.record.number == 1
    choice = choose_winner(records(study), max_drop=0.05)
    assert not choice.qualified and choice.record.number == 3  # most accurate non-baseline
    assert "best-effort" in choice.reason


def test_settings_flags_override_file_and_validate(tmp_path) -> None:
    settings = merge_settings({"budget": 10, "eval_data": "data", "example": "digits"}, {"budget": 30, "model": None}, tmp_path)
    assert settings.search.budget == 30 and settings.data.eval_data == tmp_path / "data"
    with pytest.raises(SensisearchError, match="--budget 0"):
        merge_settings({"model": "m.onnx"}, {"budget": 0}, None)
    with pytest.raises(SensisearchError, match="unknown key 'bugdet'"):
        merge_settings({"bugdet": 3}, {}, None)


def test_bundled_study_files_parse(tmp_path) -> None:

    from sensisearch.study.config._settings import read_study_file

    studies = REPO / "studies"
    files = sorted(studies.glob("*.toml"))
    assert {f.name for f in files} >= {"digits.toml", "yolov5-coco.toml"}
    for path in files:
        settings = merge_settings(read_study_file(path), {}, path.parent)
        assert settings.search.budget > 0 and settings.storage.out is not None
    bad = tmp_path / "bad.toml"
    bad.write_text("budget = [")
    with pytest.raises(SensisearchError, match="not valid TOML"):
        read_study_file(bad)


def test_report_says_plainly_when_int8_is_not_faster() -> None:
    from sensisearch.study.review._report import int8_speed_verdict

    slow = records(_study([(99.0, 10.0), (98.0, 10.2)], {0: "fp32", 1: "int8"}))
    verdict, text = int8_speed_verdict(slow)
    assert verdict is False and "INT8 brings no speed" in text and "not a speed/accuracy trade-off" in text
    fast = records(_study([(99.0, 10.0), (98.0, 4.0)], {0: "fp32", 1: "int8"}))
    verdict, text = int8_speed_verdict(fast)
    assert verdict is True and "2.50x faster" in text


def test_no_winner_slower_than_fp32() -> None:
    """Accurate but slower than FP32 is dominated by FP32: best-effort, not a qualified winner."""
    study = _study([(99.0, 10.0), (98.0, 6.0), (98.9, 11.0), (98.95, 12.0)], {0: "fp32", 1: "int8"})
    choice = choose_winner(records(study), max_drop=0.5)
    assert not choice.qualified
    assert choice.record.number == 3 and "faster than FP32" in choice.reason


def test_trial_record_round_trips_through_real_storage(tmp_path) -> None:  # noqa: ANN001
    """What the runner stores with to_attrs() reads back equal from a real SQLite storage, and
    attributes written by an older version (or a failed trial) read back as defaults."""
    from sensisearch.study import TrialRecord

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    written = TrialRecord(
        0, baseline="int8", metric="top1", metrics={"top1": 91.5, "top5": 99.0},
        latency={"median_ms": 1.25, "p90_ms": 1.5, "mean_ms": 1.3, "min_ms": 1.1, "runs": 40, "batch_size": 1},
        config=TrialConfig.from_dict({"precisions": {"conv1": "int8"}, "calibration": {"algorithm": "minmax", "samples": 64, "percentile": 99.99}}),
        artifact="a.onnx", deployable="d.onnx", trial_json="t.json", layer_precisions={"int8": 1, "fp32": 0},
        timings={"build": 0.5}, per_class={"cat": 50.0}, worst_class={"name": "cat", "drop": 2.0},
    )
    study.add_trial(optuna.trial.create_trial(values=[91.5, 1.25], user_attrs=written.to_attrs()))
    # An old-style trial: only a few keys, as versions before the record wrote for a failure.
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"error": "boom"}))
    reloaded = optuna.load_study(study_name=study.study_name, storage=storage)
    new, old = records(reloaded)
    assert new == TrialRecord(**{**written.__dict__, "state": "COMPLETE", "value": 91.5})
    assert new.median_ms == 1.25 and new.requested_counts() == {"int8": 1, "fp16": 0, "fp32": 0}
    assert old.state == "FAIL" and old.error == "boom" and old.value is None
    assert (old.baseline, old.metric, old.latency, old.config, old.per_class, old.worst_class) == (None, None, {}, None, None, None)
    assert old.median_ms is None and TrialRecord.recorded_error(reloaded.trials[1]) == "boom"
    # Unset fields are not written, so a failed record stores only what it knows.
    assert TrialRecord(3, error="x", baseline="fp32").to_attrs() == {"baseline": "fp32", "error": "x"}
