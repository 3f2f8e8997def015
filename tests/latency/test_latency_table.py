"""The per-layer latency table: JSON round trip, prediction of a held-out configuration, trtexec parsing, bad input."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys

import numpy as np
import pytest

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.errors import SensisearchError
from sensisearch.latency import LatencyPredictor, LatencyTable, load_latency_table
from sensisearch.latency._table import fit_overhead
from sensisearch.latency._attribution import NameAttribution
from sensisearch.latency._measure import end_to_end_ms, measure_table
from sensisearch.study.run import table_pipeline
from sensisearch.latency._profile_tensorrt import attribute_tensorrt, parse_trtexec_profile
from sensisearch.quantize.config import Precision, TrialConfig
from sensisearch.quantize.profiles import PROFILES
from sensisearch.study.trial._predicted import latency_predictor
from sensisearch.study.config._settings import StudySettings
from conftest import TESTS

DATA = TESTS / "data"
REPEATS = 25


@pytest.fixture(scope="module")
def digits_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ltable")
    return (*table_pipeline(StudySettings.from_flat(example="digits"), tmp / "cache", "onnxruntime-cpu", threads=2), tmp)


@pytest.fixture(scope="module")
def digits(digits_inputs):
    pipeline, calibration, feeds, model_path, tmp = digits_inputs
    table = measure_table(pipeline, calibration, feeds, tmp / "work", model_path=model_path, repeats=REPEATS, timing_seconds=4)
    return pipeline, calibration, feeds, table, tmp


def test_table_round_trips_through_json_exactly(digits):
    _, _, _, table, tmp = digits
    path = tmp / "table.json"
    table.save(path)
    loaded = load_latency_table(path)
    assert loaded == table
    assert loaded.to_dict() == table.to_dict()
    assert isinstance(loaded, LatencyPredictor) and loaded.source == "table" and loaded.unit == "ms"
    # The loaded table binds itself to the model it names and predicts the same.
    config = {n: "int8" if i % 3 else "fp32" for i, n in enumerate(table.layers)}
    assert loaded.predict(config) == pytest.approx(table.predict(config))


def test_table_records_its_threads_and_a_study_timing_at_other_threads_is_told(digits, caplog):
    pipeline, _, _, table, tmp = digits
    # Profiled and anchored on the timing sessions, and recorded as such.
    threads = pipeline.backend.timing_backend().threads
    assert table.threads == threads >= 1
    assert f"{threads} thread" in table.label
    path = tmp / "table-threads.json"
    table.save(path)
    settings = StudySettings.from_flat(example="digits", latency_table=path)
    for study_threads, told in ((threads, False), (threads + 1, True)):
        caplog.clear()
        backend = OnnxRuntimeBackend(threads=study_threads, profile=PROFILES["onnxruntime-cpu"])
        with caplog.at_level(logging.WARNING):
            predictor = latency_predictor(settings, "onnxruntime-cpu", backend, pipeline.model, pipeline.info)
        assert predictor is not None and predictor.predict(dict.fromkeys(table.layers, "int8")) == pytest.approx(
            table.predict(dict.fromkeys(table.layers, "int8")))
        assert (f"profiled at {threads} threads per session, this study times at {threads + 1}" in caplog.text) == told
    # A table written before the thread count was recorded reads as unknown, and nothing is told.
    data = table.to_dict()
    del data["threads"]
    old = tmp / "table-no-threads.json"
    old.write_text(json.dumps(data))
    assert load_latency_table(old).threads is None
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        latency_predictor(StudySettings.from_flat(example="digits", latency_table=old), "onnxruntime-cpu",
                          OnnxRuntimeBackend(threads=threads + 1, profile=PROFILES["onnxruntime-cpu"]), pipeline.model, pipeline.info)
    assert "threads per session" not in caplog.text


def test_attribution_accounts_for_the_profiled_time(digits):
    _, _, _, table, _ = digits
    # Every profiled configuration's kernel time is reproduced by the table's kernel terms (layers + Q/DQ + layout
    # + rest), and almost all of the profiled time is attributed to layers or Q/DQ tensors.
    # (onnxruntime-cpu profile: an INT8 conv's kernel depends on whether its neighbours are INT8 too,
    # which per-layer medians average over, so a single configuration may be off by ~20%.)
    for record in table.configs:
        assert record["predicted_kernel_ms"] == pytest.approx(record["measured_ms"], rel=0.35), record
        assert record["end_to_end_ms"] is not None and record["predicted_ms"] == pytest.approx(record["end_to_end_ms"], rel=0.35), record
    total_measured = sum(r["measured_ms"] for r in table.configs)
    assert sum(r["predicted_kernel_ms"] for r in table.configs) == pytest.approx(total_measured, rel=0.1)
    # Digits' non-layer kernels (residual Add, pooling, flatten) are 20-28% of its kernel time depending on the
    # machine's load; the bound only says most of the time is attributed.
    assert table.unmapped_share < 0.5
    assert set(table.layers) == set(digits[0].info.layer_names)
    # Every layer has an FP32 and an INT8 time; INT8 layers entered at a precision boundary (checkerboards) their own
    # (the stem's input, the model input, is always such a boundary).
    assert all("fp32" in costs and set(costs) - {"fp32"} and set(costs) <= {"int8", "int8@entry", "fp32"} for costs in table.layers.values())
    assert set(table.layers["stem/0/Conv"]) == {"fp32", "int8@entry"}
    assert sum("int8" in costs and "int8@entry" in costs for costs in table.layers.values()) >= 3
    # Kernel counts per layer are whole kernels, and INT8 layers differ from FP32 ones in what ORT runs for them.
    assert all(float(v).is_integer() and v >= 1 for costs in table.layer_kernels.values() for v in costs.values())


def test_fit_overhead_recovers_a_known_scale_rate_and_offset():
    rng = np.random.default_rng(0)
    kernel_ms = rng.uniform(0.2, 2.0, 8)
    kernels = rng.integers(10, 60, 8).astype(float)
    end_to_end = 0.9 * kernel_ms - 0.004 * kernels + 0.02
    assert fit_overhead(kernel_ms, kernels, end_to_end) == pytest.approx((0.9, -0.004, 0.02), abs=1e-9)
    # Too few configurations for three unknowns: the ratio of the sums, nothing else.
    assert fit_overhead([1.0, 2.0], [10, 20], [1.5, 3.0]) == pytest.approx((1.5, 0.0, 0.0))
    assert fit_overhead([], [], []) == (1.0, 0.0, 0.0)


def test_fit_overhead_keeps_the_scale_alone_when_the_extra_terms_fit_noise():
    # Six configurations like the profiled set: kernel counts follow kernel times, and the end-to-end times are
    # the kernel times scaled by load (1.3x) with 3% timing noise. The truth has no per-kernel term.
    rng = np.random.default_rng(3)
    kernel_ms = np.array([1.00, 0.55, 0.80, 0.78, 0.62, 0.70])
    kernels = np.round(20 + 30 * kernel_ms + rng.normal(0, 1, 6))
    end_to_end = 1.3 * kernel_ms * (1 + rng.normal(0, 0.03, 6))
    scale, per_kernel, offset = fit_overhead(kernel_ms, kernels, end_to_end)
    assert (per_kernel, offset) == (0.0, 0.0)
    assert scale == pytest.approx(end_to_end.sum() / kernel_ms.sum(), rel=0.03)
    # Independent check of why: the unrestricted three-term least squares drifts from the truth (1.3, 0, 0) on a
    # held-out configuration, which the kept model does not.
    full = np.linalg.lstsq(np.stack([kernel_ms, kernels, np.ones(6)], axis=1), end_to_end, rcond=None)[0]
    held_ms, held_kernels = 0.35, 60.0  # many kernels, little time: off the fitted line
    truth = 1.3 * held_ms
    assert abs(full @ [held_ms, held_kernels, 1.0] - truth) > abs(scale * held_ms - truth)


def test_fit_overhead_keeps_a_real_per_kernel_cost():
    # The profiler's per-kernel inflation is real on small models: the end-to-end time is the kernel time minus
    # 5 us per kernel, with 1% noise, over kernel counts that vary independently of the time.
    rng = np.random.default_rng(4)
    kernel_ms = rng.uniform(0.3, 1.0, 6)
    kernels = rng.integers(10, 60, 6).astype(float)
    end_to_end = (kernel_ms - 0.005 * kernels + 0.3) * (1 + rng.normal(0, 0.01, 6))
    scale, per_kernel, offset = fit_overhead(kernel_ms, kernels, end_to_end)
    assert per_kernel == pytest.approx(-0.005, rel=0.3) and scale == pytest.approx(1.0, rel=0.15)


def test_table_predicts_a_held_out_configuration_end_to_end(digits, digits_inputs):
    pipeline, calibration, feeds, table, tmp = digits
    layers = pipeline.info.layer_names
    rng = random.Random(7)
    mixes = {}
    while len(mixes) < 3:  # seeded random mixes, never one of the profiled configurations
        precisions = {n: rng.choice([Precision.INT8, Precision.FP32]) for n in layers}
        kinds = [precisions[n] for n in layers]
        alternating = all(kinds[i] != kinds[i + 1] for i in range(len(kinds) - 1))
        if len(set(kinds)) == 2 and not alternating:
            mixes[f"held{len(mixes)}"] = TrialConfig(precisions, calibration)
    mixes["fp32"] = TrialConfig.uniform(layers, Precision.FP32, calibration)
    artifacts = {}
    for name, config in mixes.items():
        deployable, _ = pipeline.emit(config, tmp / name)
        artifacts[name] = pipeline.build(deployable, tmp / name, config).artifact
    fp32 = {n: Precision.FP32 for n in layers}

    def errors(table: LatencyTable) -> tuple[list[float], list[float]]:
        # The truth: session.run without the profiler, paired against FP32 in the same rounds.
        measured = end_to_end_ms(pipeline, artifacts, feeds, "fp32", seconds=6)
        anchored_errors, kernel_errors = [], []
        for name, config in mixes.items():
            if name == "fp32":
                continue
            truth = measured["fp32"] / measured[name]
            anchored = table.speedup(config.precisions)
            kernel_only = table.kernel_ms(fp32) / table.kernel_ms(config.precisions)
            anchored_errors.append(abs(anchored - truth) / truth)
            kernel_errors.append(abs(kernel_only - truth) / truth)
        return anchored_errors, kernel_errors

    # Both sides are timings on a shared 2-core machine, and a busy moment during either moves a ratio: two CI runs
    # saw errors of 35% and 38% where a quiet machine gives 1-7%. As the product re-times a disturbed timing, a
    # table and its truth are measured afresh, up to twice more; a wrong predictor fails all three.
    attempts = []
    for attempt in range(3):
        if attempt:
            table = measure_table(pipeline, calibration, feeds, tmp / f"work-again-{attempt}", model_path=digits_inputs[3],
                                  repeats=REPEATS, timing_seconds=4)
        anchored_errors, kernel_errors = errors(table)
        attempts.append((anchored_errors, kernel_errors))
        # Wide: ORT-CPU INT8 kernels that depend on their neighbours (see README).
        # The end-to-end anchor is what makes the table predict session.run, not the profiler's kernel sum.
        if max(anchored_errors) < 0.3 and sum(anchored_errors) < sum(kernel_errors) + 0.05:
            return
    raise AssertionError(f"the table missed a held-out mix by 30% or more in every attempt (anchored, kernel-only): {attempts}")


def test_trtexec_profile_is_parsed_and_attributed_by_name(digits):
    pipeline = digits[0]
    layers = parse_trtexec_profile(json.loads((DATA / "trtexec_profile_digits.json").read_text()))
    assert layers["layer1/conv2/Conv"] == pytest.approx(0.06)
    attribution = NameAttribution(pipeline.model, pipeline.info, pipeline.index)
    charged = attribute_tensorrt(layers, attribution)
    assert charged.layer_ms == pytest.approx({"stem/0/Conv": 0.02, "layer1/conv1/Conv": 0.05, "layer1/conv2/Conv": 0.06, "fc/Gemm": 0.01})
    assert charged.qdq_ms == pytest.approx({"input": 0.009})
    assert charged.rest_ms == pytest.approx(0.011)  # the reformat layer at the precision boundary
    assert charged.total_ms == pytest.approx(0.16)
    assert charged.kernels == len(layers) and charged.rest_kernels == 1
    with pytest.raises(SensisearchError, match="not a trtexec --exportProfile"):
        parse_trtexec_profile([{"name": "x", "averageMs": 1.0}])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "not readable JSON"),
        (json.dumps({"format": "other"}), "is not a sensisearch latency table"),
        (json.dumps({"format": "sensisearch-latency-table", "version": 99}), "format version 99"),
    ],
)
def test_bad_table_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SensisearchError, match=message) as info:
        load_latency_table(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_table_refuses_another_model(digits):
    table: LatencyTable = digits[3]
    with pytest.raises(SensisearchError, match="does not match this model"):
        table.check_matches("0" * 64, table.layer_names)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "t.txt"], "--out t.txt: give the table's .json file path"),
        (["--out", "t.json", "--repeats", "0"], "--repeats 0"),
        (["--model", "missing.onnx", "--out", "t.json"], "missing.onnx"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    argv = ["latency-table", *(args if "--model" in args else ["--example", "digits", *args])]
    done = subprocess.run([sys.executable, "-m", "sensisearch", *argv], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
