"""Pareto front and winner selection, checked against Optuna's own front."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from sensisearch.study.results import choose_winner, pareto_front, records
from sensisearch.study.settings import merge_settings
from sensisearch.errors import SensisearchError


def _study(points: list[tuple[float, float]], baselines: dict[int, str] | None = None) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i, (acc, ms) in enumerate(points):
        attrs = {"latency": {"median_ms": ms, "p90_ms": ms}, "metric": "top1", "config": {"precisions": {}, "calibration": {}}}
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
    base = {"config": {"precisions": {}, "calibration": {}}, "metric": "top1"}
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
    assert settings.budget == 30 and settings.eval_data == tmp_path / "data"
    with pytest.raises(SensisearchError, match="--budget 0"):
        merge_settings({"model": "m.onnx"}, {"budget": 0}, None)
    with pytest.raises(SensisearchError, match="unknown key 'bugdet'"):
        merge_settings({"bugdet": 3}, {}, None)


def test_bundled_study_files_parse(tmp_path) -> None:
    from pathlib import Path

    from sensisearch.study.settings import read_study_file

    studies = Path(__file__).resolve().parents[1] / "studies"
    files = sorted(studies.glob("*.toml"))
    assert {f.name for f in files} >= {"digits.toml", "yolov5-coco.toml"}
    for path in files:
        settings = merge_settings(read_study_file(path), {}, path.parent)
        assert settings.budget > 0 and settings.out is not None
    bad = tmp_path / "bad.toml"
    bad.write_text("budget = [")
    with pytest.raises(SensisearchError, match="not valid TOML"):
        read_study_file(bad)


def test_report_says_plainly_when_int8_is_not_faster() -> None:
    from sensisearch.study.report import int8_speed_verdict

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
