"""Nested study settings: study files with and without tables, the one serializer, and what earlier releases stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest

from sensisearch.cli import build_parser
from sensisearch.cli._parser import settings_from_args
from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import CalibrationAlgorithm, Precision
from sensisearch.study import StudySettings, load_run_settings, merge_settings, read_study_file
from sensisearch.study.config import setting_names
from sensisearch.study.store._finished import open_finished_run, run_settings
from sensisearch.study.store._worker import SETTINGS_ATTR, settings_to_store, stored_settings

LEGACY = Path(__file__).resolve().parents[2] / "data" / "legacy_study"


def _from_flags(*flags: str) -> StudySettings:
    return settings_from_args(build_parser().parse_args(["run", *flags]))


def _from_file(tmp_path: Path, text: str) -> StudySettings:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return merge_settings(read_study_file(path), {}, path.parent)


# --------------------------------------------------------------------------- study files
FLAT = """
example = "digits"
budget = 12
sampler = "random"
precisions = ["int8", "fp32"]
max_drop = 0.5
backend = "onnxruntime"
timing_max_seconds = 0.5
keep_artifacts = "all"
compare_ort_quantizer = true
eval_data = "data"
"""

TABLES = """
[data]
example = "digits"
eval_data = "data"

[search]
budget = 12
sampler = "random"
precisions = ["int8", "fp32"]

[acceptance]
max_drop = 0.5

[backend]
backend = "onnxruntime"

[measurement]
timing_max_seconds = 0.5

[execution]
keep_artifacts = "all"

[report]
compare_ort_quantizer = true
"""


def test_flat_and_table_study_files_load_to_what_the_flags_give(tmp_path: Path) -> None:
    flat, tables = _from_file(tmp_path, FLAT), _from_file(tmp_path, TABLES)
    flags = _from_flags(
        "--example", "digits", "--budget", "12", "--sampler", "random", "--precisions", "int8,fp32", "--max-drop", "0.5",
        "--backend", "onnxruntime", "--timing-max-seconds", "0.5", "--keep-artifacts", "all", "--compare-ort-quantizer",
        "--eval-data", str(tmp_path / "data"),
    )
    assert flat == tables == flags
    assert flat.search.budget == 12 and flat.search.precisions == [Precision.INT8, Precision.FP32]
    assert flat.acceptance.max_drop == 0.5 and flat.backend.backend == "onnxruntime"
    assert flat.measurement.timing_seconds == 0.5 and flat.execution.keep_artifacts is None
    assert flat.report.compare_ort_quantizer and flat.data.eval_data == tmp_path / "data"  # relative to the file


def test_flags_override_the_study_file(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(TABLES)
    args = build_parser().parse_args(["run", str(path), "--budget", "40", "--max-drop", "2"])
    settings = settings_from_args(args)
    assert (settings.search.budget, settings.acceptance.max_drop, settings.search.sampler) == (40, 2.0, "random")


@pytest.mark.parametrize(("text", "message"), [
    ("[search]\nbugdet = 3\nexample = \"digits\"\n", "study file: unknown key 'bugdet'"),
    ("bugdet = 3\nexample = \"digits\"\n", "study file: unknown key 'bugdet'"),
    ("[search]\nbudget = \"ten\"\nexample = \"digits\"\n", "study file: budget = 'ten': must be a whole number"),
    ("example = \"digits\"\nmax_drop = \"1\"\n", "study file: max_drop = '1': must be a number"),
    ("example = \"digits\"\n[search]\nbudget = 0\n", "--budget 0: must be a positive number of trials"),
    ("example = \"digits\"\n[data]\npreprocess = \"fancy\"\n", "--preprocess fancy: use one of yolo, imagenet, raw"),
])
def test_an_unknown_key_or_wrong_type_is_one_line_naming_it(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SensisearchError) as exc:
        _from_file(tmp_path, text)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- the serializer
def _unusual() -> StudySettings:
    return StudySettings.from_flat(
        model=Path("/models/m.onnx"), eval_data=Path("/data/eval"), mean=[0.485, 0.456, 0.406], std=[0.2, 0.2, 0.2],
        budget=7, seed=3, precisions=["int8", "fp16"], algorithms=[CalibrationAlgorithm.MSE, "percentile"],
        sample_counts=[64], percentiles=[99.0], sampler="seeded", search="topk", top_k=3, fidelity_subset=0.25,
        backend="onnxruntime", threads=2, latency_batch=4, objective="throughput", throughput_batch=16, verify=False,
        latency_seconds=0.2, max_drop=0.3, max_class_drop=2.0, min_speedup=1.1, isolation="none", keep_artifacts="all",
        heartbeat_seconds=5, out=Path("/runs/x"), storage="sqlite:////runs/x/study.db", study_name="x",
        compare_ort_quantizer=True, preprocess="imagenet", channel_order="bgr", layout="nhwc", iou=0.5,
    )


def test_to_dict_is_nested_json_and_from_dict_reads_it_back() -> None:
    settings = _unusual()
    data = json.loads(json.dumps(settings.to_dict()))
    assert set(data) == set(StudySettings.RECORDS)
    assert data["search"]["precisions"] == ["int8", "fp16"] and data["data"]["model"] == "/models/m.onnx"
    assert data["execution"]["keep_artifacts"] == "all"  # None (keep all) would read back as the default 10
    assert StudySettings.from_dict(data) == settings
    assert StudySettings.from_dict(StudySettings().to_dict() | {"data": {"example": "digits"}}).data.example == "digits"


def test_from_dict_reads_the_flat_form_and_a_mix() -> None:
    settings = _unusual()
    nested = settings.to_dict()
    flat = {name: value for record in nested.values() for name, value in record.items()}
    assert set(flat) == set(setting_names())
    assert StudySettings.from_dict(flat) == settings
    # A study file's top-level keys beside its tables.
    mixed = {**nested["search"], "data": nested["data"], "backend": "onnxruntime"}
    assert StudySettings.from_dict(mixed) == StudySettings.from_flat(**nested["search"], **nested["data"], backend="onnxruntime")


def test_from_flat_is_the_flag_path() -> None:
    assert StudySettings.from_flat(example="digits", budget=3, max_drop=0.5) == _from_flags(
        "--example", "digits", "--budget", "3", "--max-drop", "0.5",
    )
    with pytest.raises(SensisearchError, match="--top-k 0: must be a positive number of layers"):
        StudySettings.from_flat(example="digits", top_k=0)


def test_replace_and_get_use_the_flag_names() -> None:
    settings = StudySettings.from_flat(example="digits")
    changed = settings.replace(budget=9, latency_table=Path("/t.json"))
    assert changed.get("budget") == changed.search.budget == 9 and changed.backend.latency_table == Path("/t.json")
    assert settings.search.budget == 50  # a copy
    with pytest.raises(SensisearchError, match="unknown setting 'bugdet'"):
        settings.replace(bugdet=3)


def test_stored_settings_mask_the_url_and_make_paths_absolute(tmp_path: Path) -> None:
    settings = StudySettings.from_flat(
        example="digits", eval_data=Path("rel/data"), storage="postgresql://user:secret@host/db",
    )
    stored = settings_to_store(settings, tmp_path / "out")
    assert "secret" not in json.dumps(stored) and stored["storage"]["storage"].count("***") == 1
    assert stored["storage"]["out"] == str((tmp_path / "out").resolve())
    assert Path(stored["data"]["eval_data"]).is_absolute()


# --------------------------------------------------------------------------- what the previous release stored
def _legacy_flags(out: str) -> StudySettings:
    """The flags that made the legacy study (``run --example digits --budget 3 --no-verify``), with the
    example's files and preprocessing filled in as the stored settings record them, and the sampler and
    search that release defaulted to (TPE over every layer), which its stored settings name."""
    legacy = json.loads((LEGACY / "settings.json").read_text())
    return _from_flags(
        "--example", "digits", "--budget", "3", "--no-verify", "--out", out, "--sampler", "tpe", "--search", "full",
        "--model", legacy["model"], "--calib-data", legacy["calib_data"], "--eval-data", legacy["eval_data"],
        "--mean", "0.5", "--std", "0.5",
    )


def test_the_legacy_settings_json_loads_into_the_nested_settings(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(LEGACY / "settings.json", run_dir / "settings.json")  # no study.db: the settings.json fallback
    settings = load_run_settings(run_dir)
    assert settings == _legacy_flags(str(run_dir))
    assert StudySettings.from_dict(json.loads((LEGACY / "settings.json").read_text())) == _legacy_flags("/tmp/legacy/run")


def test_the_legacy_stored_user_attribute_loads_into_the_nested_settings(tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    shutil.copy(LEGACY / "study.db", db)  # never the fixture itself: opening may migrate it
    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name="digits_resnet", storage=url)
    stored = study.user_attrs[SETTINGS_ATTR]
    assert "budget" in stored  # flat, as the previous release stored it
    assert StudySettings.from_dict(stored) == _legacy_flags("/tmp/legacy/run")
    # The readers of stored settings: `worker` (stored_settings) and `report`/`verify` (run_settings).
    worker = stored_settings(url, "digits_resnet", {})
    assert worker == _legacy_flags("/tmp/legacy/run").replace(storage=url, study_name="digits_resnet")
    report = run_settings(open_finished_run(tmp_path), {}, {})
    assert report == _legacy_flags(str(tmp_path)).replace(storage=url, study_name="digits_resnet")
    assert load_run_settings(tmp_path) == report
