"""The review (report.html + PNGs) and the hand-off export.

The HTML is opened in a real headless Chromium with the network off: Chromium's
own console log (``--enable-logging=stderr``) must show no message from the
page, its net log no request from the page, the rendered DOM one Pareto marker
per trial, and its screenshot the plot's colours. A control page with a
deliberate exception and an external image proves the harness catches both.

The export is checked on a real deployable ONNX the library emits for the
bundled digits example; tensor types are read back with ``onnx`` independently
of the emitter.
"""

from __future__ import annotations

import dataclasses
import html

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from matplotlib.image import imread
from onnx import TensorProto

from sensisearch.errors import SensisearchError
from sensisearch.export import (
    DEPLOYABLE_FILE,
    ExportFormat,
    exact_name_patterns,
    export_trial,
    trtexec_command,
)
from sensisearch.report import (
    PARETO_DIV,
    PRECISION_COLOURS,
    ClassAPRow,
    FloatLayerEvidence,
    PointKind,
    ReviewData,
    ReviewPoint,
    SensitivityRow,
    ci_offsets,
    configuration_summary,
    flatten_provenance,
    negate_ci,
    precision_codes,
    render_report_html,
    write_review,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Hosts Chromium itself contacts (updates, time, accounts) even headless; the
# host-resolver rule makes them fail. Anything else in the net log came from the page.
BROWSER_OWN_HOSTS = ("google.com", "googleapis.com", "gstatic.com", "gvt1.com", "~notfound")

# --------------------------------------------------------------------------- review data


def _hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)


def _review_data() -> ReviewData:
    """A study-shaped review: 3 baselines, a reference quantizer, searched points
    (front, off-front, one infeasible), a winner; every precision occurs."""
    layers = [f"/model.{i}/conv/Conv" for i in range(12)]
    rng = np.random.default_rng(7)

    def config(kind: str, i: int) -> dict[str, str]:
        if kind in ("int8", "fp16", "fp32"):
            return dict.fromkeys(layers, kind)
        choices = rng.choice(["int8", "int8", "int8", "fp16", "fp32"], size=len(layers))
        return dict(zip(layers, (str(c) for c in choices)))

    points = [
        ReviewPoint(0, 93.7, 0.0, 1.0, PointKind.BASELINE, "fp32", (-0.2, 0.2), (0.97, 1.03), precisions=config("fp32", 0),
                    latencies_ms=list(rng.normal(1.0, 0.02, 40))),
        ReviewPoint(1, 92.1, 1.6, 2.0, PointKind.BASELINE, "int8", (1.2, 2.0), (1.9, 2.1), precisions=config("int8", 1),
                    calibration="minmax n=256", latencies_ms=list(rng.normal(0.5, 0.01, 40))),
        ReviewPoint(2, 93.6, 0.1, 1.1, PointKind.BASELINE, "fp16", None, None, precisions=config("fp16", 2)),
        ReviewPoint(3, 92.9, 0.8, 1.8, PointKind.REFERENCE, "ort-quantize_static minmax", (0.5, 1.1), (1.7, 1.9),
                    latencies_ms=list(rng.normal(0.55, 0.01, 40))),
    ]
    for t in range(4, 16):
        points.append(ReviewPoint(
            t, 93.7 - 0.1 * (t - 3), 0.1 * (t - 3), 1.2 + 0.05 * t, drop_ci95=(0.1 * (t - 3) - 0.2, 0.1 * (t - 3) + 0.2),
            speedup_ci95=(1.15 + 0.05 * t, 1.25 + 0.05 * t), on_front=t % 4 == 0, is_winner=t == 8, feasible=t != 5,
            precisions=config("search", t), calibration="entropy n=256", latencies_ms=list(rng.normal(0.7, 0.02, 40)),
        ))
    winner = next(p for p in points if p.is_winner)
    evidence = [
        FloatLayerEvidence(layer, p, f"only-this-INT8 drop {0.3 + j:.2f} points, sensitivity rank {j + 1}")
        for j, (layer, p) in enumerate((lp for lp in winner.precisions.items() if lp[1] != "int8"))
    ]
    return ReviewData(
        metric_name="top1",
        points=points,
        layers=layers,
        sensitivity=[SensitivityRow(layer, 0.05 * i, 1.6 - 0.1 * i) for i, layer in enumerate(layers)],
        winner_classes=[ClassAPRow("person", 120, 55.0, 54.2), ClassAPRow("dog", 7, 40.0, 31.5), ClassAPRow("car", 40, 30.0, 30.4)],
        float_layer_evidence=evidence,
        provenance={"model": {"path": "digits.onnx", "sha256": "ab" * 32}, "calibration": "calib.npz 512 samples",
                    "versions": {"onnxruntime": "1.32.0"}, "machine": "2-core x86_64"},
        noise="Two FP32 runs differ by 1.01x: speed-ups inside [0.97, 1.03] are noise.",
    )


# --------------------------------------------------------------------------- pure helpers


def test_precision_codes_follow_graph_order_and_mark_missing():
    layers = ["a", "b", "c"]
    points = [ReviewPoint(1, 1, 0, 1, precisions={"c": "fp32", "a": "int8"}), ReviewPoint(2, 1, 0, 1, precisions={"b": "fp16"})]
    np.testing.assert_array_equal(precision_codes(layers, points), [[0, -1, 2], [-1, 1, -1]])


def test_ci_offsets_and_negated_ci():
    minus, plus = ci_offsets([1.0, 2.0, 3.0], [(0.5, 1.25), None, (3.5, 4.0)])
    # A CI that does not contain its value (e.g. a bootstrap of a median) clips at 0, never negative.
    np.testing.assert_allclose(minus, [0.5, 0.0, 0.0])
    np.testing.assert_allclose(plus, [0.25, 0.0, 1.0])
    assert negate_ci((0.2, 1.5)) == (-1.5, -0.2)
    assert negate_ci(None) is None


def test_configuration_summary_names_every_exception():
    point = ReviewPoint(3, 90, 1, 2, precisions={"a": "int8", "b": "fp16", "c": "int8", "d": "fp32"}, calibration="mse n=64")
    text = configuration_summary(point)
    assert "2 INT8 / 1 FP16 / 1 FP32" in text and "all INT8 except 2" in text
    assert "b: FP16" in text and "d: FP32" in text and "a:" not in text and "mse n=64" in text


def test_flatten_provenance_nested():
    rows = flatten_provenance({"model": {"path": "m.onnx", "sha256": "ff"}, "versions": ["a", "b"], "seed": None})
    assert rows == [("model.path", "m.onnx"), ("model.sha256", "ff"), ("versions", "a, b"), ("seed", "")]


def test_review_data_rejects_inconsistent_points():
    with pytest.raises(ValueError, match="more than once"):
        ReviewData("m", [ReviewPoint(1, 1, 0, 1), ReviewPoint(1, 1, 0, 1)], [])
    with pytest.raises(ValueError, match="not in ReviewData.layers"):
        ReviewData("m", [ReviewPoint(1, 1, 0, 1, precisions={"x": "int8"})], ["a"])
    with pytest.raises(ValueError, match="not one of"):
        ReviewData("m", [ReviewPoint(1, 1, 0, 1, precisions={"a": "int4"})], ["a"])


# --------------------------------------------------------------------------- HTML and PNGs


@pytest.fixture(scope="module")
def review(tmp_path_factory) -> tuple[ReviewData, Path]:
    data = _review_data()
    out = tmp_path_factory.mktemp("review")
    write_review(data, out)
    return data, out


def test_html_is_self_contained(review):
    data, out = review
    text = (out / "report.html").read_text()
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", text)
    # The page outside the embedded plotly.js library names no URL at all (the
    # library itself carries map-tile URLs for trace types the report never uses).
    head, body = text.split("</head>", 1)
    page = re.sub(r"<script type=\"text/javascript\">.*?</script>", "", head, count=1, flags=re.S) + body
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    # Tables readable without JS: provenance, per-class (worst first), evidence.
    assert "ab" * 32 in body and body.index(">dog<") < body.index(">person<") < body.index(">car<")
    for row in data.float_layer_evidence:
        assert row.evidence in body


def test_html_shows_the_probes_speed_column_only_where_they_were_timed():
    data = _review_data()
    assert "speed vs all-INT8" not in render_report_html(data)
    timed = [dataclasses.replace(r, speed_all_but_this_int8=(1.13, 1.1, 1.15) if i == 0 else None)
             for i, r in enumerate(data.sensitivity)]
    page = render_report_html(dataclasses.replace(data, sensitivity=timed))
    assert "all but this INT8: speed vs all-INT8 [95% CI]" in page
    assert '<td class="num">1.13x [1.10, 1.15]</td>' in page and '<td class="num">n/a</td>' in page


def test_html_without_evidence_says_so():
    data = _review_data()
    bare = ReviewData(data.metric_name, data.points, data.layers)
    assert "no evidence was recorded" in render_report_html(bare)


def test_html_shows_the_held_out_change_only_for_a_study_that_holds_images_out():
    data = _review_data()
    assert "held-out" not in render_report_html(data)
    scored = {0: (0.0, None), 1: (2.5, (1.9, 3.1)), 8: (0.4, (-0.3, 1.2))}  # FP32, all-INT8, the winner
    points = [dataclasses.replace(p, holdout_drop=scored[p.trial][0], holdout_drop_ci95=scored[p.trial][1])
              if p.trial in scored else p for p in data.points]
    note = "Accuracy resolution: on these 40 evaluation images a trial's drop is known to +-1.50 points"
    page = render_report_html(dataclasses.replace(data, points=points, holdout_images=40, accuracy_notes=[note]))
    # The winner's line and its row give the change (the negated drop) with the negated CI.
    assert "On the 40 held-out images the search never saw: change vs FP32 -0.400 [-1.20, 0.30]" in page
    assert "<th>held-out change [95% CI] (40 images)</th>" in page and html.escape(note) in page
    rows = re.findall(r"<tr>(.*?)</tr>", page.split("<h2>Pareto front</h2>", 1)[1].split("</table>", 1)[0])
    cells = {re.sub(r"<.*?>", "", r.split("</td>", 1)[0]).split(" ")[0]: re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows[1:]}
    assert cells["#1"][5] == "-2.500 [-3.10, -1.90]" and cells["#0"][5] == "+0.000"
    assert cells["#4"][5] == "-"  # not scored on the held-out images


def _chromium(tmp: Path, url: str, *extra: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    net_log = tmp / "net.json"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
        "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr", "--v=0", f"--log-net-log={net_log}", "--virtual-time-budget=5000", *extra, url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    hosts = set(re.findall(r"https?://([A-Za-z0-9.~_-]+)", net_log.read_text(errors="replace"))) if net_log.exists() else set()
    page_hosts = {h for h in hosts if not any(h == own or h.endswith("." + own) for own in BROWSER_OWN_HOSTS)}
    return proc, page_hosts


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run installs it)")


@needs_chromium
def test_harness_catches_page_errors_and_requests(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<html><body><script>throw new Error("deliberate");</script><img src="https://cdn.plot.ly/x.png"></body></html>')
    proc, hosts = _chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert any("deliberate" in line for line in _console_lines(proc.stderr)), proc.stderr[-2000:]
    assert "cdn.plot.ly" in hosts


@needs_chromium
def test_html_renders_offline_in_chromium(review, tmp_path):
    data, out = review
    proc, hosts = _chromium(tmp_path, (out / "report.html").as_uri(), "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _console_lines(proc.stderr) == []
    assert hosts == set()
    dom = proc.stdout
    start = dom.index(f'id="{PARETO_DIV}"')
    end = dom.index("</table>", start)  # the Pareto table follows the plot
    markers = re.findall(r'<path class="point[" ]', dom[start:end])
    assert len(markers) == len(data.points)


@needs_chromium
def test_html_screenshot_shows_the_plot(review, tmp_path):
    _, out = review
    shot = tmp_path / "shot.png"
    proc, _ = _chromium(tmp_path, (out / "report.html").as_uri(), f"--screenshot={shot}", "--window-size=1280,1400")
    assert shot.exists(), proc.stderr[-2000:]
    pixels = imread(shot)[..., :3] * 255
    assert pixels.std() > 0
    # The winner's star is drawn in its colour: the plot really rendered.
    assert _has_colour(pixels, "#d62828")


def _has_colour(pixels: np.ndarray, colour: str, tol: float = 6.0) -> bool:
    return bool((np.abs(pixels - _hex_rgb(colour)).max(axis=-1) <= tol).any())


def test_pngs_load_and_show_their_content(review):
    data, out = review
    pareto = imread(out / "pareto.png")[..., :3] * 255
    assert pareto.std() > 0 and _has_colour(pareto, "#d62828")
    pmap = imread(out / "precision_map.png")[..., :3] * 255
    assert pmap.std() > 0
    used = {p for point in data.front() for p in point.precisions.values()}
    assert used == {"int8", "fp16", "fp32"}
    for precision in used:
        assert _has_colour(pmap, PRECISION_COLOURS[precision]), precision


# --------------------------------------------------------------------------- export


def _emit_deployable(out_dir: Path, precisions: list[str]) -> tuple[Path, dict, Path]:
    """A real deployable ONNX for the digits example, made by the library.

    The one place that calls the emitter; adapt here if its API changes.
    """
    from sensisearch.examples.digits import MODEL_PATH
    from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
    from sensisearch.study.run import prepare
    from sensisearch.study.config._settings import StudySettings

    ctx = prepare(StudySettings.from_flat(example="digits", out=out_dir / "study", sample_counts=[64], precisions=list(Precision)))
    layers = list(ctx.space.layers)
    config = TrialConfig(
        {layer: Precision(precisions[i % len(precisions)]) for i, layer in enumerate(layers)},
        CalibrationChoice(CalibrationAlgorithm.PERCENTILE, 64, 99.9),
    )
    path, _ = ctx.pipeline.emit(config, out_dir / "trial")
    return path, config.to_dict(), MODEL_PATH


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    deployable, config, fp32 = _emit_deployable(tmp, ["int8", "fp16", "int8", "fp32"])
    result = export_trial(deployable, config, tmp / "handoff", fp32_model=fp32, max_batch=8)
    return deployable, config, result


def _weight_types(model: onnx.ModelProto, layer: str) -> str:
    """How a layer's weight reaches it: ``int8`` (int8 initializer behind
    DequantizeLinear), ``fp16`` or ``fp32`` (float initializer)."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == layer)
    weight = node.input[1]
    if weight in producer and producer[weight].op_type == "DequantizeLinear":
        source = inits[producer[weight].input[0]]
        return "int8" if source.data_type == TensorProto.INT8 else f"dq-of-{source.data_type}"
    return {TensorProto.FLOAT16: "fp16", TensorProto.FLOAT: "fp32"}.get(inits[weight].data_type, "other")


def test_exported_onnx_tensor_types_match_config(exported):
    _, config, result = exported
    model = onnx.load(result.files["deployable"])
    got = {layer: _weight_types(model, layer) for layer in config["precisions"]}
    assert got == config["precisions"]
    assert set(got.values()) == {"int8", "fp16", "fp32"}


def test_trtexec_names_the_deployable_onnx(exported):
    _, _, result = exported
    script = result.files["trtexec"].read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip().startswith("trtexec ")]
    assert len(commands) == 2
    ten, eleven = sorted(commands, key=lambda c: "--stronglyTyped" in c, reverse=True)
    for command in (ten, eleven):
        assert f"--onnx={DEPLOYABLE_FILE}" in command.split()
        assert (result.folder / DEPLOYABLE_FILE).is_file()
        # The digits input is [batch, 1, 32, 32] with a dynamic batch: a profile 1/1/8.
        assert "--minShapes=input:1x1x32x32" in command and "--maxShapes=input:8x1x32x32" in command
        assert not {"--fp16", "--int8", "--best"} & set(command.split())
    assert "--stronglyTyped" in ten and "--stronglyTyped" not in eleven


def test_modelopt_exclude_list_is_the_float_layers(exported):
    _, config, result = exported
    settings = json.loads(result.files["modelopt"].read_text())
    floats = [layer for layer, p in config["precisions"].items() if p in ("fp16", "fp32")]
    assert settings["nodes_to_exclude"] == floats
    assert result.files["modelopt_exclude"].read_text().split() == floats
    assert settings["calibration_method"] == "entropy" and settings["high_precision_dtype"] == "fp32"
    # The patterns in the command select exactly those nodes of the FP32 model copy.
    fp32_nodes = [n.name for n in onnx.load(result.files["fp32"]).graph.node]
    patterns = exact_name_patterns(floats)
    assert [n for n in fp32_nodes if any(re.search(p, n) for p in patterns)] == floats
    ort = json.loads(result.files["onnxruntime"].read_text())
    assert ort["nodes_to_exclude"] == floats and ort["calibrate_method"] == "Percentile"
    assert ort["extra_options"] == {"CalibPercentile": 99.9}


def test_polygraphy_compares_deployable_with_fp32(exported):
    _, _, result = exported
    lines = [line.split() for line in result.files["polygraphy"].read_text().splitlines() if line.startswith("polygraphy ")]
    reference, compare = lines
    assert reference[2] == "model_fp32.onnx" and "--save-outputs" in reference
    assert compare[2] == DEPLOYABLE_FILE and {"--trt", "--onnxrt", "--load-outputs", "--atol", "--rtol"} <= set(compare)
    assert (result.folder / "model_fp32.onnx").is_file()


def test_trtexec_command_static_shapes_and_bad_version():
    from sensisearch.backends.tensorrt.builder import ProfileShape

    static = {"images": ProfileShape((1, 3, 640, 640), (1, 3, 640, 640), (1, 3, 640, 640))}
    assert trtexec_command("d.onnx", static, "d.plan", 11) == "trtexec --onnx=d.onnx --saveEngine=d.plan --shapes=images:1x3x640x640"
    with pytest.raises(SensisearchError, match="TensorRT major version 9"):
        trtexec_command("d.onnx", static, "d.plan", 9)


def test_export_errors_name_the_file_or_flag(exported, tmp_path):
    deployable, config, _ = exported
    with pytest.raises(SensisearchError, match="nope.onnx: deployable ONNX not found"):
        export_trial(tmp_path / "nope.onnx", config, tmp_path / "out")
    with pytest.raises(SensisearchError, match="--model"):
        export_trial(deployable, config, tmp_path / "out", formats=[ExportFormat.MODELOPT])
    with pytest.raises(SensisearchError, match="--format"):
        export_trial(deployable, config, tmp_path / "out", formats=["tflite"])
    wrong = {"precisions": {"not/a/layer": "fp16"}, "calibration": config["calibration"]}
    with pytest.raises(SensisearchError, match="not nodes of this ONNX"):
        export_trial(deployable, wrong, tmp_path / "out", formats=[ExportFormat.ONNX])
