"""Study identity and configuration equality (issue: a study is one experiment)."""

from __future__ import annotations

import itertools
import json

import pytest

from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.study.run._identity import StudyIdentity, effective_config_key

LAYERS = ["conv_a", "conv_b", "fc"]


def _identity(**changes: object) -> StudyIdentity:
    base = dict(
        model_sha256="a" * 64, eval_data="e" * 64, calib_data="c" * 64, task="classification", metric="top1",
        evaluation={"preprocess": {"mean": [0.5], "std": [0.5]}}, backend="onnxruntime", profile="onnxruntime-cpu",
        timing={"objective": "latency", "batch": 1}, search_space={"precisions": ["int8", "fp32"]}, device="cpu:x",
    )
    base.update(changes)
    return StudyIdentity(**base)  # type: ignore[arg-type]


def test_identity_round_trips_through_json_storage() -> None:
    ident = _identity(search_space={"sample_counts": (128, 256)})
    stored = json.loads(json.dumps(ident.to_dict()))
    assert StudyIdentity.from_dict(stored).to_dict() == ident.to_dict()
    assert ident.differences(stored) == []


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("model_sha256", "b" * 64, "--model"),
        ("eval_data", "f" * 64, "--eval-data"),
        ("calib_data", None, "--calib-data"),
        ("evaluation", {"preprocess": {"mean": [0.0], "std": [1.0]}}, "--mean"),
        ("device", "cpu:y", "machine"),
        ("timing", {"objective": "throughput", "batch": 8}, "--objective"),
    ],
)
def test_each_difference_names_its_flag(field: str, value: object, flag: str) -> None:
    recorded = _identity().to_dict()
    diffs = _identity(**{field: value}).differences(recorded)
    assert len(diffs) == 1 and flag in diffs[0]
    # sha256 digests are shortened, never printed whole
    assert "a" * 64 not in diffs[0] and "b" * 64 not in diffs[0]


def test_fields_unknown_to_an_older_study_are_not_differences() -> None:
    recorded = _identity().to_dict()
    del recorded["device"]
    assert _identity(device="gpu:H100").differences(recorded) == []


def _cfg(precisions: list[Precision], algorithm: CalibrationAlgorithm, samples: int = 128, pct: float = 99.99) -> TrialConfig:
    return TrialConfig(dict(zip(LAYERS, precisions)), CalibrationChoice(algorithm, samples, pct))


def test_config_key_ignores_what_cannot_change_the_model() -> None:
    fp32 = [Precision.FP32] * 3
    # No INT8 layer: calibration is irrelevant.
    assert effective_config_key(_cfg(fp32, CalibrationAlgorithm.MINMAX)) == effective_config_key(
        _cfg(fp32, CalibrationAlgorithm.ENTROPY, 512, 99.9)
    )
    mixed = [Precision.INT8, Precision.FP32, Precision.FP16]
    # The clip percentile only matters to percentile calibration.
    for algorithm in (CalibrationAlgorithm.MINMAX, CalibrationAlgorithm.ENTROPY, CalibrationAlgorithm.MSE):
        assert effective_config_key(_cfg(mixed, algorithm, pct=99.9)) == effective_config_key(_cfg(mixed, algorithm, pct=99.999))
    assert effective_config_key(_cfg(mixed, CalibrationAlgorithm.PERCENTILE, pct=99.9)) != effective_config_key(
        _cfg(mixed, CalibrationAlgorithm.PERCENTILE, pct=99.999)
    )


def test_config_key_is_injective_over_what_matters() -> None:
    """Brute force: distinct effective configurations give distinct keys, equal ones equal keys."""
    seen: dict[str, tuple] = {}
    for precisions in itertools.product(list(Precision), repeat=len(LAYERS)):
        for algorithm in CalibrationAlgorithm:
            for samples in (128, 256):
                for pct in (99.9, 99.99):
                    uses_int8 = Precision.INT8 in precisions
                    effective = (
                        precisions,
                        algorithm if uses_int8 else None,
                        samples if uses_int8 else None,
                        pct if uses_int8 and algorithm in (CalibrationAlgorithm.PERCENTILE, CalibrationAlgorithm.MIXED) else None,
                    )
                    key = effective_config_key(_cfg(list(precisions), algorithm, samples, pct))
                    assert seen.setdefault(key, effective) == effective
    # 27 precision combinations: 8 without INT8 (fp16/fp32 only), 19 with INT8, each with
    # 3 algorithms x 2 counts + (percentile, mixed) x 2 counts x 2 percentiles.
    assert len(seen) == 8 + 19 * (3 * 2 + 2 * 2 * 2)
