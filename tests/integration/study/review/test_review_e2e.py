"""Issue 11 end to end: a real digits study -> report.html (Chromium, offline), PNGs,
report.md, ``sensisearch report``, ``sensisearch export``, optuna-dashboard, CLI output.

The study runs for real (ONNX Runtime, Optuna SQLite storage) from a relative
``--out``; every check reads its files back independently of the code that
wrote them (onnx for tensor types, the dashboard's own WSGI app for the
objective names, pycocotools' annotation file for instance counts).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import numpy as np
import onnx
import optuna
import pytest
from matplotlib.image import imread
from integration.report.test_review import _chromium, _console_lines, _has_colour, _weight_types, needs_chromium

from sensisearch.cli import PIPED_WIDTH, build_parser, main, make_console
from sensisearch.export import DEPLOYABLE_FILE
from sensisearch.report import PARETO_DIV, PRECISION_COLOURS, SensitivityRow
from sensisearch.quantize.config import TrialConfig
from sensisearch.study.store._record import TrialRecord
from sensisearch.study.store._timing import PairedTiming
from sensisearch.study.review._review import float_layer_evidence, speedup_of

# Whole studies in subprocesses (minutes): left out of the quick lowest-versions CI run.
pytestmark = pytest.mark.slow

from conftest import REPO
MAX_DROP = "0.1"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 6-trial digits study, run from its parent folder with a RELATIVE --out."""
    parent = tmp_path_factory.mktemp("review-e2e")
    cwd = Path.cwd()
    os.chdir(parent)
    try:
        code = main([
            "run", "--example", "digits", "--budget", "6", "--out", "run", "--latency-seconds", "0.2",
            "--sample-counts", "64,128", "--seed", "3", "--max-drop", MAX_DROP, "--sampler", "tpe", "--search", "full",
        ])
    finally:
        os.chdir(cwd)
    assert code == 0
    return parent / "run"


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="digits_resnet", storage=f"sqlite:///{out / 'study.db'}")


def _complete(out: Path) -> list[TrialRecord]:
    return [r for r in map(TrialRecord.from_trial, _study(out).get_trials()) if r.state == "COMPLETE"]


def _winner(out: Path) -> TrialRecord:
    number = json.loads((out / "winner" / "config.json").read_text())["trial"]
    return next(r for r in _complete(out) if r.number == number)


# --------------------------------------------------------------------------- what every run writes


def test_run_writes_review_files_linked_from_report_md(study_dir: Path) -> None:
    report = (study_dir / "report.md").read_text()
    for name in ("report.html", "pareto.png", "precision_map.png"):
        assert (study_dir / name).is_file()
        assert f"({name})" in report
    # The marginal "most harmful first" table is gone; the calibration table says what it is.
    assert "most harmful" not in report
    assert "does not measure an algorithm's effect" in report


def test_pngs_are_not_blank(study_dir: Path) -> None:
    pareto = imread(study_dir / "pareto.png")[..., :3] * 255
    assert pareto.std() > 0 and _has_colour(pareto, "#d62828")  # the winner's star
    precision_map = imread(study_dir / "precision_map.png")[..., :3] * 255
    assert precision_map.std() > 0 and _has_colour(precision_map, PRECISION_COLOURS["int8"])


def test_report_md_names_the_winners_float_layers_with_evidence(study_dir: Path) -> None:
    winner = _winner(study_dir)
    floats = [name for name, p in winner.precisions.items() if p != "int8"]
    report = (study_dir / "report.md").read_text()
    section = report.split("## What each precision choice did", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `([^`]+)`", row).group(1) for row in rows] == floats
    for row in rows:
        # Each row names which measurement backs it.
        assert re.search(r"trial #\d+|baseline \(#\d+\)|sensitivity profile|no measurement", row), row
    winner_section = report.split("## Winner", 1)[1].split("##", 1)[0]
    for name in floats:
        assert f"`{name}`" in winner_section


def test_change_column_is_signed(study_dir: Path) -> None:
    recs = {r.number: r for r in _complete(study_dir)}
    fp32 = next(r for r in recs.values() if r.baseline == "fp32")
    report = (study_dir / "report.md").read_text()
    front = report.split("## Pareto front", 1)[1].split("##", 1)[0]
    header = next(line for line in front.splitlines() if line.startswith("| trial"))
    assert "change vs FP32" in header
    # The change may carry its CI and a noise label: "-0.40 ± 0.47 (within noise)".
    change_cell = r"([+-][\d.]+)(?: ± [\d.]+)?(?: \(within noise\))?"
    rows = [m for m in (re.match(r"\| (\d+)[^|]* \| [\d.]+ \| " + change_cell + r" \|", line) for line in front.splitlines()) if m]
    assert rows
    for m in rows:
        change = round(recs[int(m.group(1))].value - fp32.value, 2) + 0.0  # type: ignore[operator]
        assert m.group(2)[0] in "+-" and float(m.group(2)) == change, m.group(0)
        assert m.group(2).startswith("-") == (change < 0)


def test_pareto_json_paths_are_absolute(study_dir: Path) -> None:
    entries = json.loads((study_dir / "pareto.json").read_text())
    assert entries
    for entry in entries:
        for key in ("artifact", "deployable_onnx"):
            path = Path(entry[key])
            assert path.is_absolute() and path.is_file(), entry[key]
            assert path.parent == (study_dir / "trials" / f"{entry['number']:04d}").resolve()


@needs_chromium
def test_report_html_opens_offline_with_one_marker_per_trial(study_dir: Path, tmp_path: Path) -> None:
    proc, hosts = _chromium(tmp_path, (study_dir / "report.html").as_uri(), "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _console_lines(proc.stderr) == []
    assert hosts == set()
    dom = proc.stdout
    start = dom.index(f'id="{PARETO_DIV}"')
    markers = re.findall(r'<path class="point[" ]', dom[start : dom.index("</table>", start)])
    assert len(markers) == len(_complete(study_dir))
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, (study_dir / "report.html").as_uri(), f"--screenshot={shot}", "--window-size=1280,1400")
    pixels = imread(shot)[..., :3] * 255
    assert pixels.std() > 0 and _has_colour(pixels, "#d62828")


def test_optuna_dashboard_shows_named_objectives(study_dir: Path) -> None:
    from optuna_dashboard import wsgi

    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir / 'study.db'}")
    app = wsgi(storage)
    study_id = storage.get_study_id_from_name("digits_resnet")
    environ: dict = {"PATH_INFO": f"/api/studies/{study_id}", "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), body[:300]
    assert json.loads(body)["objective_names"] == ["top1", "latency_ms"]


# --------------------------------------------------------------------------- sensisearch report


def test_report_command_rewrites_results_without_trials_or_calibration(study_dir: Path, tmp_path: Path) -> None:
    trials_before = len(_study(study_dir).get_trials())
    for name in ("report.md", "report.html", "pareto.png", "precision_map.png", "pareto.json"):
        (study_dir / name).unlink()
    cache = study_dir / "cache"
    cache.rename(study_dir / "cache-away")  # no statistics: a pass would have to run, and must not
    cwd = Path.cwd()
    os.chdir(tmp_path)  # another directory: settings and paths come from the study
    try:
        assert main(["report", str(study_dir)]) == 0
    finally:
        os.chdir(cwd)
        (study_dir / "cache-away").rename(cache)
    assert len(_study(study_dir).get_trials()) == trials_before
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()
    for name in ("report.md", "report.html", "pareto.png", "precision_map.png", "pareto.json"):
        assert (study_dir / name).is_file(), name
    winner = _winner(study_dir)
    config = json.loads((study_dir / "winner" / "config.json").read_text())
    recorded = json.loads(Path(winner.trial_json).read_text() if Path(winner.trial_json).is_absolute()
                          else (study_dir / "trials" / f"{winner.number:04d}" / "trial.json").read_text())["thresholds"]
    assert config["thresholds"] == recorded and config["max_drop"] == float(MAX_DROP)
    # The winner folder is complete although the trials recorded paths relative to another directory.
    assert {Path(name).name for name in config["files"].values()} == {"deployable.onnx", Path(winner.artifact).name}
    assert all((study_dir / "winner" / name).is_file() for name in config["files"].values())
    assert _study(study_dir).user_attrs["settings"]["storage"]["storage"] is None


def test_report_command_errors_name_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'study.db'}: no study here" in " ".join(err.split()) and "Traceback" not in err


# --------------------------------------------------------------------------- sensisearch export


@pytest.fixture(scope="module")
def exported(study_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrialRecord, Path]:
    out = tmp_path_factory.mktemp("handoff")
    code = main(["export", str(study_dir), "--trial", "winner", "--format", "onnx,trtexec,modelopt,onnxruntime,polygraphy",
                 "--out", str(out), "--max-batch", "8"])
    assert code == 0
    return _winner(study_dir), out


def test_export_onnx_tensor_types_match_the_trial(exported: tuple[TrialRecord, Path]) -> None:
    record, out = exported
    model = onnx.load(out / DEPLOYABLE_FILE)
    assert {layer: _weight_types(model, layer) for layer in record.precisions} == record.precisions
    assert record.config is not None and json.loads((out / "config.json").read_text()) == record.config.to_dict()


def test_export_trtexec_names_the_deployable(exported: tuple[TrialRecord, Path]) -> None:
    _, out = exported
    commands = [line.split() for line in (out / "trtexec.sh").read_text().splitlines() if line.strip().startswith("trtexec ")]
    assert len(commands) == 2
    for command in commands:
        assert f"--onnx={DEPLOYABLE_FILE}" in command and "--maxShapes=input:8x1x32x32" in command


def test_export_exclude_lists_are_the_trials_float_layers(exported: tuple[TrialRecord, Path]) -> None:
    record, out = exported
    floats = [name for name, p in record.precisions.items() if p in ("fp16", "fp32")]
    assert json.loads((out / "modelopt.json").read_text())["nodes_to_exclude"] == floats
    assert (out / "modelopt.txt").read_text().split() == floats
    assert json.loads((out / "onnxruntime.json").read_text())["nodes_to_exclude"] == floats
    compare = [line for line in (out / "polygraphy.sh").read_text().splitlines() if line.startswith("polygraphy ")][1]
    assert compare.split()[2] == DEPLOYABLE_FILE and (out / "model_fp32.onnx").is_file()


def test_export_modelopt_writes_the_calibration_samples_its_command_names(exported: tuple[TrialRecord, Path]) -> None:
    """calib.npy holds the winner's calibration set as the study drew it: the first ``samples`` of the
    seeded permutation of the example's calib.npz, preprocessed ((x / 255 - 0.5) / 0.5, NCHW)."""
    record, out = exported
    settings = json.loads((out / "modelopt.json").read_text())
    assert "--calibration_data_path=calib.npy" in settings["command"]
    samples = record.config.calibration.samples  # type: ignore[union-attr]
    written = np.load(out / "calib.npy")
    images = np.load(REPO / "sensisearch" / "examples" / "digits" / "calib.npz")["images"]
    order = np.random.default_rng(3).permutation(len(images))[:samples]  # --seed 3, the study's
    expected = ((images[order].astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None]
    assert written.shape == expected.shape == (samples, 1, 32, 32) and written.dtype == np.float32
    np.testing.assert_allclose(written, expected, atol=1e-6)


def test_export_piped_output_keeps_paths_whole(study_dir: Path, tmp_path: Path) -> None:
    """Through a real pipe (not a terminal): each written file's absolute path on one line."""
    deep = tmp_path / ("a-long-folder-name-" * 6) / "trial-export"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    proc = subprocess.run(
        [sys.executable, "-m", "sensisearch", "export", str(study_dir), "--trial", "1", "--out", str(deep)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"deployable: {deep / DEPLOYABLE_FILE}" in proc.stdout.splitlines()


def test_export_bad_trial_is_one_line(study_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(study_dir), "--trial", "999"]) == 2
    err = capsys.readouterr().err
    assert "--trial 999" in err and "Traceback" not in err


# --------------------------------------------------------------------------- CLI details


def test_every_subcommand_has_a_description() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"run", "evaluate", "build", "doctor", "report", "export"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        assert sub.description and len(sub.description) > 20, name


def test_piped_console_does_not_wrap(capsys: pytest.CaptureFixture[str]) -> None:
    console = make_console()  # stdout is captured: not a terminal
    assert not console.is_terminal and console.width == PIPED_WIDTH
    path = "/very/long/" + "x" * 300 + "/deployable.onnx"
    console.print(path)
    assert path in capsys.readouterr().out.splitlines()


def test_statistics_pass_reports_progress() -> None:
    from sensisearch.calibration import collect_statistics
    from sensisearch.examples.digits import MODEL_PATH

    model = onnx.load(MODEL_PATH)
    tensor = model.graph.node[0].output[0]
    name = model.graph.input[0].name
    rng = np.random.default_rng(0)
    batches = ({name: rng.normal(size=(16, 1, 32, 32)).astype(np.float32)} for _ in range(10))
    calls: list[tuple[int, int]] = []
    collect_statistics(MODEL_PATH, [tensor], batches, [24, 48], progress=lambda seen, total: calls.append((seen, total)))
    seen = [s for s, _ in calls]
    assert {t for _, t in calls} == {48} and seen == sorted(seen) and seen[-1] == 48
    assert 24 in seen  # the checkpoint inside the second batch is its own run


def test_evaluate_per_class_shows_instance_counts(yolo_model: Path, coco_dev: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    annotations = coco_dev / "instances.json"
    limit = 6
    code = main(["evaluate", "--model", str(yolo_model), "--eval-data", str(coco_dev / "images"), "--annotations",
                 str(annotations), "--eval-limit", str(limit), "--per-class", "--cache-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    # Independent count: non-crowd boxes of the first `limit` images of the annotation file.
    data = json.loads(annotations.read_text())
    images = {im["id"] for im in data["images"][:limit]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    expected = Counter(names[a["category_id"]] for a in data["annotations"] if a["image_id"] in images and not a.get("iscrowd"))
    rows = {m.group(1).strip(): int(m.group(2)) for m in re.finditer(r"│\s*([^│]+?)\s*│\s*(\d+)\s*│\s*[-\d.]+\s*│", out)}
    assert expected and {name: rows.get(name) for name in expected} == dict(expected)


# --------------------------------------------------------------------------- evidence and speed (pure)


def paired_timing(speedup: float, lo: float, hi: float) -> PairedTiming:
    """An in-study paired timing with the given speed-up and CI (the other figures do not matter here)."""
    return PairedTiming(speedup, (lo, hi), 0.1, 1.0 / speedup, 1.0, 1.0 / speedup, 1.0, 30, 1.0, "ci", (), facts={})


def _rec(number: int, value: float, precisions: dict[str, str], baseline: str | None = None, **kw) -> TrialRecord:
    return TrialRecord(number, state="COMPLETE", value=value, baseline=baseline, latency={"median_ms": 1.0},
                       config=TrialConfig.from_dict({"precisions": precisions, "calibration": {"algorithm": "minmax", "samples": 64}}), **kw)


def test_evidence_prefers_profile_then_identical_trial_then_nearest_then_all_int8() -> None:
    layers = ["a", "b", "c", "d"]
    fp32 = _rec(0, 90.0, dict.fromkeys(layers, "fp32"), "fp32")
    int8 = _rec(1, 88.5, dict.fromkeys(layers, "int8"), "int8")
    winner = _rec(2, 89.6, {"a": "fp32", "b": "fp16", "c": "fp32", "d": "fp32"})
    only_a = _rec(3, 89.1, {"a": "int8", "b": "fp16", "c": "fp32", "d": "fp32"})  # identical but for a
    only_a_worse = _rec(4, 88.0, {"a": "int8", "b": "fp16", "c": "fp32", "d": "fp32"})
    near_b = _rec(5, 89.9, {"a": "fp32", "b": "int8", "c": "fp32", "d": "int8"})  # b INT8, one other difference (d)
    recs = [fp32, int8, winner, only_a, only_a_worse, near_b]
    evidence = {e.layer: e for e in float_layer_evidence(winner, recs, [SensitivityRow("d", 0.7, None)])}
    assert list(evidence) == ["a", "b", "c", "d"]
    assert evidence["a"].evidence.startswith("trial #3, identical but for this layer") and "-0.50 points (a loss)" in evidence["a"].evidence
    assert "#5" in evidence["b"].evidence and "1 other" in evidence["b"].evidence and "+0.30 points (a gain)" in evidence["b"].evidence
    assert "all-INT8 baseline (#1)" in evidence["c"].evidence and "-1.50 points" in evidence["c"].evidence
    assert evidence["d"].evidence.startswith("sensitivity profile") and "-0.70 points" in evidence["d"].evidence
    assert evidence["b"].precision == "fp16"
    # A layer kept in float for speed: the profile's timed all-but-this-layer probe is part of its evidence.
    timed = {e.layer: e for e in float_layer_evidence(winner, recs, [SensitivityRow("c", 0.0, 1.2, (1.13, 1.10, 1.15))])}
    assert timed["c"].evidence == ("sensitivity profile: only this layer INT8: +0.00 points (no change) vs FP32; every layer but "
                                   "this one INT8: -1.20 points (a loss) vs FP32; that model ran 1.13x [1.10, 1.15] the speed "
                                   "of all-INT8 (timed interleaved)")


def test_speedup_paired_when_measured_else_unpaired_ratio() -> None:
    fp32 = _rec(0, 90.0, {"a": "fp32"}, "fp32")
    plain = TrialRecord(1, state="COMPLETE", value=89.0, latency={"median_ms": 0.25})
    paired = TrialRecord(2, state="COMPLETE", value=89.0, latency={"median_ms": 0.25},
                         paired=paired_timing(3.2, 3.0, 3.4))
    assert speedup_of(plain, fp32) == (4.0, None, False)
    assert speedup_of(paired, fp32) == (3.2, (3.0, 3.4), True)
    assert speedup_of(fp32, fp32) == (1.0, None, False)
