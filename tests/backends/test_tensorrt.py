"""TensorRT backend: real engines built through sensisearch's own build path.

CI has no GPU; TensorRT-RTX (``tensorrt-rtx-cu13``, in the ``dev`` extra) builds
engines ahead of time on the CPU, so every build below is real: the bundled
digits ResNet (dynamic batch -> optimization profile) and the real YOLOv5n in
``shared/data`` (skipped when that folder is missing), each as all-FP32,
all-FP16, all-INT8 and a mixed assignment, emitted by
``emit_deployable_onnx`` with the TENSORRT profile and thresholds from real
activations (ONNX Runtime on real inputs).

What cannot run here (deserialize, execute, time, engine inspector) is covered
by the ``gpu``-marked tests at the end, skipped without a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import TESTS

from sensisearch.backends.base import LatencySettings
from sensisearch.backends.tensorrt import (
    BuilderSettings,
    available_flavors,
    DriverInfo,
    GpuInfo,
    MachineInfo,
    TensorRTBackend,
    TensorRTFlavor,
    can_run_on,
    can_run_tensorrt,
    check_sidecar,
    detect_flavor,
    make_tensorrt_backend,
    network_precisions,
    parse_inspector_json,
    parse_onnx,
    parse_shapes,
    precision_problems,
    read_sidecar,
    resolve_profile,
    sidecar_path,
)
from sensisearch.backends.tensorrt.flavor import flavor_from_module, probe_driver
from sensisearch.backends.tensorrt.inspector import datatype_precision, onnx_names, tactic_precision
from sensisearch.backends.tensorrt.runtime import batch_chunks, enough_samples
from sensisearch.doctor import doctor_report, format_doctor
from sensisearch.errors import SensisearchError
from sensisearch.examples.digits import CALIB_PATH, EVAL_PATH, MODEL_PATH
from sensisearch.model import ModelInfo, analyze_model
from sensisearch.onnx_compat import make_model
from sensisearch.quantize import (
    TENSORRT,
    Precision,
    TensorRange,
    TrialConfig,
    emit_deployable_onnx,
    plan_placement,
    save_model,
    statistics_tensors,
)

DATA = TESTS / "data"
CONFIG_NAMES = ("fp32", "fp16", "int8", "mixed")
CYCLE = (Precision.INT8, Precision.FP16, Precision.FP32)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def flavor() -> TensorRTFlavor:
    """A flavor that can run engines here if there is one (GPU box), else TensorRT-RTX (builds on the CPU)."""
    flavors = available_flavors()
    runnable = [f for f in flavors if can_run_tensorrt(f)[0]]
    if runnable:
        return runnable[0]
    rtx = [f for f in flavors if f.is_rtx]
    if not rtx:
        pytest.skip("no GPU and tensorrt_rtx does not import: pip install -e '.[dev]' (installs tensorrt-rtx-cu13)")
    return rtx[0]


def _configs(names: list[str]) -> dict[str, TrialConfig]:
    return {
        "fp32": TrialConfig.uniform(names, Precision.FP32),
        "fp16": TrialConfig.uniform(names, Precision.FP16),
        "int8": TrialConfig.uniform(names, Precision.INT8),
        # every third layer INT8 / FP16 / FP32, so all three meet as neighbours
        "mixed": TrialConfig({n: CYCLE[i % 3] for i, n in enumerate(names)}),
    }


def _activation_ranges(model: onnx.ModelProto, info: ModelInfo, batches: list[dict[str, np.ndarray]]) -> dict[str, TensorRange]:
    """Min-max thresholds of every tensor the emitter may quantize, from real activations (ORT)."""
    tensors = statistics_tensors(model, info)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    amax = dict.fromkeys(tensors, 0.0)
    amin = dict.fromkeys(tensors, np.inf)
    for feeds in batches:
        values = dict(zip(names, session.run(None, feeds)))
        for t in tensors:
            amax[t] = max(amax[t], float(np.abs(values[t]).max()))
            amin[t] = min(amin[t], float(values[t].min()))
    return {t: TensorRange(amax[t], bool(amin[t] >= 0)) for t in tensors}


def _digits_inputs(n: int = 32, path: Path = CALIB_PATH) -> np.ndarray:
    images = np.load(path)["images"][:n].astype(np.float32)
    return (((images / 255.0) - 0.5) / 0.5)[:, None]


def _build_all(flavor: TensorRTFlavor, model_path: Path, batches: list[dict[str, np.ndarray]], out: Path) -> dict:
    info, model = analyze_model(model_path)
    ranges = _activation_ranges(model, info, batches)
    backend = make_tensorrt_backend(flavor, timing_cache=out / "timing.cache", opt_batch=1, max_batch=64)
    built = {}
    for name, config in _configs(info.layer_names).items():
        trial_dir = out / name
        deployable = save_model(
            emit_deployable_onnx(model, info, plan_placement(info, model, config, TENSORRT), ranges, TENSORRT),
            trial_dir / "deployable.onnx",
        )
        result = backend.build(deployable, trial_dir, trial_config=config.to_dict(), layer_names=info.layer_names)
        built[name] = types.SimpleNamespace(config=config, deployable=deployable, result=result)
    return {"info": info, "backend": backend, "built": built}


@pytest.fixture(scope="module")
def digits_built(flavor: TensorRTFlavor, tmp_path_factory: pytest.TempPathFactory) -> dict:
    x = _digits_inputs(32)
    return _build_all(flavor, MODEL_PATH, [{"input": x[:16]}, {"input": x[16:]}], tmp_path_factory.mktemp("trt-digits"))


@pytest.fixture(scope="module")
def yolo_built(flavor: TensorRTFlavor, yolo_model: Path, coco_dev: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from sensisearch.study.config._settings import StudySettings
    from sensisearch.study.config._inputs import build_evaluation, resolve_inputs

    # Calibration batches as a detector study makes them (first 2 images, letterboxed).
    cache = tmp_path_factory.mktemp("trt-yolo-cache")
    resolved = resolve_inputs(StudySettings(
        model=yolo_model, eval_data=coco_dev / "images", annotations=coco_dev / "instances.json", calib_limit=2, cache_dir=cache,
    ))
    source = build_evaluation(resolved.settings, resolved.input_spec, resolved.model, cache).calibration
    assert source is not None
    batches = [{"images": b} for b in source.batches(range(source.size), 1)]
    return _build_all(flavor, yolo_model, batches, tmp_path_factory.mktemp("trt-yolo"))


def _machine(flavor: TensorRTFlavor, name: str = "NVIDIA GeForce RTX 3090", cc: str = "8.6") -> MachineInfo:
    """A machine description with one GPU (what probe_machine returns on a GPU box)."""
    driver = DriverInfo(loaded=True, version="13.0", gpus=(GpuInfo(0, name, cc, 24576),), cuda_python="13.0.0", cuda_runtime="13.0")
    return MachineInfo(flavor=flavor, driver=driver, device=0, os="linux", arch="x86_64")


def _full_trt_flavor(version: str = "10.13.3.9") -> TensorRTFlavor:
    """A full-TensorRT flavor for sidecar checks (the module itself is not needed there)."""
    fake = types.SimpleNamespace(
        __version__=version,
        Builder=object,
        BuilderFlag=types.SimpleNamespace(FP16=1, INT8=2),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=5),
        IBuilderConfig=types.SimpleNamespace(),
        Runtime=types.SimpleNamespace(),
        ICudaEngine=types.SimpleNamespace(),
    )
    return flavor_from_module(fake, "tensorrt")  # type: ignore[arg-type]


def _direct_layer_types(flavor: TensorRTFlavor, onnx_path: Path, info: ModelInfo) -> dict[str, tuple[bool, str, str]]:
    """Straight from the TensorRT network API, independent of network_precisions():
    per quantizable layer ``(input is DQ(INT8 from QUANTIZE), input dtype, output dtype)``."""
    trt = flavor.module
    parsed = parse_onnx(onnx_path, flavor)
    net = parsed.network
    producer, by_name = {}, {}
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        by_name.setdefault(layer.name, layer)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    out = {}
    for q in info.layers:
        layer = by_name[q.name]
        x = layer.get_input(0)
        dq = producer.get(x.name)
        after_quantize = (
            dq is not None
            and dq.type == trt.LayerType.DEQUANTIZE
            and dq.get_input(0).dtype == trt.DataType.INT8
            and producer[dq.get_input(0).name].type == trt.LayerType.QUANTIZE
        )
        out[q.name] = (after_quantize, x.dtype.name, layer.get_output(0).dtype.name)
    return out


def _check_built(flavor: TensorRTFlavor, bundle: dict, name: str) -> None:
    info: ModelInfo = bundle["info"]
    entry = bundle["built"][name]
    config: TrialConfig = entry.config
    result = entry.result
    plan = result.artifact
    # the plan exists, is non-empty and starts with TensorRT's header
    assert plan.suffix == ".plan" and plan.is_file() and plan.stat().st_size > 10_000
    # its sidecar is valid and describes this plan, this ONNX and this configuration
    sidecar = read_sidecar(plan)
    assert sidecar_path(plan).is_file()
    assert sidecar["plan"]["bytes"] == plan.stat().st_size
    assert sidecar["tensorrt"]["module"] == flavor.module_name and sidecar["tensorrt"]["version"] == flavor.version
    assert sidecar["onnx"]["sha256"] == hashlib.sha256(entry.deployable.read_bytes()).hexdigest()
    assert sidecar["trial_config"] == config.to_dict()
    assert sidecar["builder"]["strongly_typed"] is True and sidecar["builder"]["profiling_verbosity"] == "DETAILED"
    assert sidecar["build_seconds"] > 0
    if flavor.is_rtx:
        assert sidecar["target"]["aot_compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0"]
        check_sidecar(sidecar, _machine(flavor), plan=plan)  # fits an RTX 3090
    else:  # full TensorRT built on this machine's GPU
        check_sidecar(sidecar, bundle["backend"].machine, plan=plan)
    # the network's tensor types before the build are exactly the configuration
    requested = {n: p.value for n, p in config.precisions.items()}
    assert result.details["network_precisions"] == requested
    assert result.details["precision_problems"] == [] and sidecar["precision_problems"] == []
    if result.details["precision_source"].startswith("network"):  # no GPU: the CPU-side check is the record
        assert dict(result.layer_precisions) == {p: len(config.layers_with(Precision(p))) for p in ("int8", "fp16", "fp32")}
    parsed = parse_onnx(entry.deployable, flavor)
    precisions = network_precisions(parsed, info.layer_names)
    assert precision_problems(precisions, config.precisions) == []
    direct = _direct_layer_types(flavor, entry.deployable, info)
    for layer, p in config.precisions.items():
        after_q, in_dtype, out_dtype = direct[layer]
        if p is Precision.INT8:
            assert after_q, f"{layer}: INT8 layer input is not DQ(QUANTIZE)"
        elif p is Precision.FP16:
            assert (after_q, in_dtype, out_dtype) == (False, "HALF", "HALF"), layer
        else:
            assert (after_q, in_dtype, out_dtype) == (False, "FLOAT", "FLOAT"), layer
    half = {t.name for t in precisions.tensors_of("HALF")}
    int8 = {t.name for t in precisions.tensors_of("INT8")}
    if name == "fp32":
        assert not half and not int8
    if name == "fp16":
        assert not int8 and half
    if name == "int8":
        assert not half and int8


# --------------------------------------------------------------------------- real builds


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_digits_engine_builds_and_matches_config(flavor: TensorRTFlavor, digits_built: dict, name: str) -> None:
    _check_built(flavor, digits_built, name)
    sidecar = read_sidecar(digits_built["built"][name].result.artifact)
    # dynamic batch: one optimization profile 1 / opt batch / max batch
    assert sidecar["profiles"] == [{"input": {"min": [1, 1, 32, 32], "opt": [1, 1, 32, 32], "max": [64, 1, 32, 32]}}]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_yolov5n_engine_builds_and_matches_config(flavor: TensorRTFlavor, yolo_built: dict, name: str) -> None:
    _check_built(flavor, yolo_built, name)
    sidecar = read_sidecar(yolo_built["built"][name].result.artifact)
    assert sidecar["profiles"] == [{"images": {"min": [1, 3, 640, 640], "opt": [1, 3, 640, 640], "max": [1, 3, 640, 640]}}]
    assert len(yolo_built["info"].layers) == 60


def test_timing_cache_is_written_and_reused(flavor: TensorRTFlavor, digits_built: dict, tmp_path: Path) -> None:
    cache = digits_built["backend"].timing_cache
    assert cache.path.is_file() and cache.path.stat().st_size > 0
    meta = json.loads(cache.meta_path.read_text())
    assert meta["module"] == flavor.module_name and meta["version"] == flavor.version
    # a later run of the same study loads it before its first build
    size = cache.path.stat().st_size
    again = make_tensorrt_backend(flavor, timing_cache=cache.path)
    again.build(digits_built["built"]["fp32"].deployable, tmp_path / "again")
    assert again.timing_cache.loaded_bytes == size
    side = read_sidecar(tmp_path / "again" / "deployable.plan")
    assert side["timing_cache"]["effective"] is flavor.features.timing_cache_effective
    # a cache written by another TensorRT version is ignored, then replaced
    cache.meta_path.write_text(json.dumps({**meta, "version": "0.0.0"}))
    other = make_tensorrt_backend(flavor, timing_cache=cache.path)
    other.build(digits_built["built"]["fp32"].deployable, tmp_path / "other")
    assert other.timing_cache.loaded_bytes == 0
    assert json.loads(cache.meta_path.read_text())["version"] == flavor.version


def test_build_failure_is_one_line(flavor: TensorRTFlavor, digits_built: dict, tmp_path: Path) -> None:
    """TensorRT-RTX cannot build FP32 GEMM for Turing: the build returns None -> one-line error."""
    if not flavor.features.aot_compute_capabilities:
        pytest.skip("needs TensorRT-RTX ahead-of-time targets")
    backend = make_tensorrt_backend(flavor, compute_capabilities=["7.5"])
    with pytest.raises(SensisearchError) as err:
        backend.build(digits_built["built"]["fp32"].deployable, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "no engine" in msg and "fc/Gemm" in msg
    assert not (tmp_path / "deployable.plan").exists()


def test_explicit_aot_targets_are_recorded(flavor: TensorRTFlavor, digits_built: dict, tmp_path: Path) -> None:
    if not flavor.features.aot_compute_capabilities:
        pytest.skip("needs TensorRT-RTX ahead-of-time targets")
    backend = make_tensorrt_backend(flavor, compute_capabilities=["8.9", "SM120"], shapes="input:1x1x32x32/8x1x32x32/32x1x32x32")
    result = backend.build(digits_built["built"]["int8"].deployable, tmp_path)
    side = read_sidecar(result.artifact)
    assert side["target"]["aot_compute_capabilities"] == ["8.9", "12.0"] and side["target"]["aot_default"] is False
    assert side["profiles"] == [{"input": {"min": [1, 1, 32, 32], "opt": [8, 1, 32, 32], "max": [32, 1, 32, 32]}}]
    check_sidecar(side, _machine(flavor, "NVIDIA GeForce RTX 4090", "8.9"))
    with pytest.raises(SensisearchError, match="sensisearch build"):
        check_sidecar(side, _machine(flavor, "NVIDIA GeForce RTX 3090", "8.6"))


# --------------------------------------------------------------------------- parse errors


def _bad_model(path: Path, kind: str) -> Path:
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    if kind == "zero_point":
        scale, zp = np.array(0.1, np.float32), np.array(3, np.int8)
    else:  # negative scale
        scale, zp = np.array(-0.1, np.float32), np.array(0, np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="bad_quantize"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="bad_dequantize"),
        helper.make_node("Conv", ["xd", "w"], ["y"], name="conv0"),
    ]
    graph = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [w, numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")],
    )
    onnx.save(make_model(graph, opset=13), path)
    return path


@pytest.mark.parametrize("kind", ["zero_point", "negative_scale"])
def test_parse_error_names_the_node(flavor: TensorRTFlavor, tmp_path: Path, kind: str) -> None:
    model = _bad_model(tmp_path / f"{kind}.onnx", kind)
    with pytest.raises(SensisearchError) as err:
        make_tensorrt_backend(flavor).build(model, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg
    assert "node 'bad_quantize' (QuantizeLinear)" in msg or "node 'bad_dequantize' (DequantizeLinear)" in msg
    assert ("zero point" in msg.lower()) if kind == "zero_point" else ("positive" in msg.lower())
    assert not (tmp_path / "out" / f"{kind}.plan").exists()


def test_int8_inside_fp16_region(flavor: TensorRTFlavor, tmp_path: Path) -> None:
    """INT8 with float16 Q/DQ scales (opset 19) between Casts: classified INT8, its HALF
    tensors are not strays, and it builds."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "w_int8"),
        numpy_helper.from_array(np.full(4, 0.01, np.float16), "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zero_point"),
        numpy_helper.from_array(np.array(0.02, np.float16), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero_point"),
    ]
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], name="x_CastToFloat16", to=TensorProto.FLOAT16),
        helper.make_node("QuantizeLinear", ["x16", "x_scale", "x_zero_point"], ["xq"], name="x_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero_point"], ["xd"], name="x_DequantizeLinear"),
        helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zero_point"], ["wd"], name="w_DequantizeLinear", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y16"], name="conv"),
        helper.make_node("Cast", ["y16"], ["y"], name="conv_CastToFloat", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "int8h",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        inits,
    )
    model = make_model(graph, opset=19)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "int8h.onnx"
    onnx.save(model, path)
    precisions = network_precisions(parse_onnx(path, flavor))
    assert precisions.layers == {"conv": "int8"}
    assert precision_problems(precisions, {"conv": Precision.INT8}) == []
    assert precision_problems(precisions, {"conv": Precision.FP32}) != []
    result = make_tensorrt_backend(flavor).build(path, tmp_path, trial_config={"precisions": {"conv": "int8"}})
    assert result.artifact.stat().st_size > 0 and result.details["precision_problems"] == []


# --------------------------------------------------------------------------- sidecar checks


def test_sidecar_mismatches_say_rebuild(flavor: TensorRTFlavor, digits_built: dict, tmp_path: Path) -> None:
    plan = digits_built["built"]["mixed"].result.artifact
    sidecar = read_sidecar(plan)

    def refused(side: dict, machine: MachineInfo, plan_path: Path | None = None) -> str:
        with pytest.raises(SensisearchError) as err:
            check_sidecar(side, machine, plan=plan_path)
        msg = str(err.value)
        assert "\n" not in msg
        return msg

    if flavor.is_rtx:
        # Hopper: TensorRT-RTX refuses compute capability 9.0
        assert "9.0" in refused(sidecar, _machine(flavor, "NVIDIA H100 80GB HBM3", "9.0"))
        # Turing was not among the default AOT targets
        assert "sensisearch build" in refused(sidecar, _machine(flavor, "NVIDIA GeForce RTX 2080 Ti", "7.5"))
        # newer than every default target ("and later")
        check_sidecar(sidecar, _machine(flavor, "NVIDIA GeForce RTX 6090", "12.1"))
    # another release of the same module
    other_version = dataclasses.replace(flavor, version="0.0.1")
    assert "sensisearch build" in refused(sidecar, _machine(other_version))
    # another TensorRT module altogether
    assert "sensisearch build" in refused(sidecar, _machine(_full_trt_flavor()))
    # no GPU on this machine: clear message, never a TensorRT crash
    no_gpu = MachineInfo(flavor=flavor, driver=DriverInfo(False, None, (), "no NVIDIA driver (libcuda.so.1 not found)"))
    assert "no NVIDIA GPU" in refused(sidecar, no_gpu)
    # a full-TensorRT plan tuned on an A100 does not run on an L4 (other CC) or an A30 (same CC, other model)
    full = _full_trt_flavor()
    built_full = {
        **sidecar,
        "tensorrt": full.to_dict(),
        "target": {"gpu": GpuInfo(0, "NVIDIA A100-SXM4-40GB", "8.0").to_dict(), "aot_compute_capabilities": None},
    }
    check_sidecar(built_full, _machine(full, "NVIDIA A100-SXM4-40GB", "8.0"))
    assert "sensisearch build" in refused(built_full, _machine(full, "NVIDIA L4", "8.9"))
    assert "sensisearch build" in refused(built_full, _machine(full, "NVIDIA A30", "8.0"))
    windows = dataclasses.replace(_machine(full, "NVIDIA A100-SXM4-40GB", "8.0"), os="win32")
    assert "sensisearch build" in refused(built_full, windows)
    # the plan was replaced after the sidecar was written
    copy = tmp_path / "copy.plan"
    copy.write_bytes(plan.read_bytes()[:-1] + b"\0")
    assert "replaced" in refused(sidecar, _machine(flavor), copy)
    # missing or foreign sidecar
    lonely = tmp_path / "lonely.plan"
    lonely.write_bytes(plan.read_bytes())
    with pytest.raises(SensisearchError, match="no sidecar"):
        read_sidecar(lonely)
    sidecar_path(lonely).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SensisearchError, match="not a sensisearch plan sidecar"):
        read_sidecar(lonely)


def test_load_without_gpu_is_a_clear_error(flavor: TensorRTFlavor, digits_built: dict) -> None:
    backend: TensorRTBackend = digits_built["backend"]
    ok, why = backend.can_run()
    if ok:
        pytest.skip(f"a GPU is usable here ({why})")
    with pytest.raises(SensisearchError) as err:
        backend.load(digits_built["built"]["int8"].result.artifact)
    msg = str(err.value)
    assert "\n" not in msg and "cannot run a TensorRT engine here" in msg
    with pytest.raises(SensisearchError, match="plan not found"):
        backend.load(Path("/nonexistent/model.plan"))


def test_deserialize_failure_is_one_line(flavor: TensorRTFlavor, digits_built: dict) -> None:
    """Below the backend's own checks: TensorRT refusing a plan is still a one-line error."""
    from sensisearch.backends.tensorrt.runtime import deserialize

    if can_run_tensorrt(flavor)[0]:
        pytest.skip("a GPU is usable here")
    with pytest.raises(SensisearchError) as err:
        deserialize(flavor, digits_built["built"]["int8"].result.artifact.read_bytes(), "int8.plan")
    assert "\n" not in str(err.value) and "could not deserialize" in str(err.value)


# --------------------------------------------------------------------------- inspector


def test_inspector_json_per_layer_precision() -> None:
    """The engine inspector needs a GPU (deserialization fails with cudaError 35 here), so
    no real inspector output can be produced on this machine: tests/data/
    tensorrt_inspector_digits_mixed.json is HAND-WRITTEN from the documented format
    (shared/docs/tensorrt-notes.md, "Engine inspector"; TensorRT's Engine Inspector docs)
    for the digits ResNet with the mixed assignment INT8/FP16/FP32 cycling over its
    10 layers: fused " + " names with PWN(...), a Reformat layer, Myelin (kgen) layers
    named only in Metadata (separated by \\x1e, one by \\x1f), long and short
    Format/Datatype strings, Weights.Type, and a Gemm whose only evidence is its tactic.
    Replace it with a real dump (TensorRTRunner.inspect()) when run on a GPU."""
    data = (DATA / "tensorrt_inspector_digits_mixed.json").read_text()
    info, _ = analyze_model(MODEL_PATH)
    config = _configs(info.layer_names)["mixed"]
    summary = parse_inspector_json(data, info.layer_names)
    assert summary.detailed and summary.missing == []
    assert summary.counts() == {"int8": 4, "fp16": 3, "fp32": 3}
    assert summary.precisions() == {n: p.value for n, p in config.precisions.items()}
    assert summary.mismatches(config.precisions) == []
    sources = {n: e.source for n, e in summary.layers.items()}
    assert sources["stem/0/Conv"] == "weights"
    assert sources["fc/Gemm"] == "tactic"
    assert sources["layer3/conv1/Conv"] == sources["layer3/conv2/Conv"] == "input"
    assert summary.reformats == 1
    # what the trial records when the engine did not do what was asked
    wrong = TrialConfig.uniform(info.layer_names, Precision.INT8)
    assert {n for n, asked, ran in summary.mismatches(wrong.precisions)} == set(config.layers_with(Precision.FP16)) | set(
        config.layers_with(Precision.FP32)
    )
    # LAYER_NAMES_ONLY verbosity: names but no precision
    names_only = parse_inspector_json({"Layers": ["stem/0/Conv + stem/2/Relu", "fc/Gemm"], "Bindings": []}, ["stem/0/Conv", "fc/Gemm", "x"])
    assert not names_only.detailed and names_only.counts() == {"int8": 0, "fp16": 0, "fp32": 0, "unknown": 3}
    assert names_only.missing == ["x"]


def test_inspector_field_parsing() -> None:
    layer = {"Name": "w_DequantizeLinear + conv1 + PWN(PWN(act1, mul1), add1)", "Metadata": "[ONNX Layer: conv1]\x1e[ONNX Layer: q2]"}
    assert onnx_names(layer) == ["conv1", "q2", "w_DequantizeLinear", "act1", "mul1", "add1"]
    assert onnx_names({"Name": "Reformatting CopyNode for Input Tensor 0 to conv1"}) == []
    assert datatype_precision("Thirty-two wide channel vectorized row major Int8 format") == "int8"
    assert datatype_precision("Channel major FP16 format where channel % 8 == 0") == "fp16"
    assert datatype_precision("Row major linear FP32 format") == "fp32"
    assert datatype_precision("Half") == "fp16" and datatype_precision("Float") == "fp32" and datatype_precision("Int8") == "int8"
    assert datatype_precision("N/A due to dynamic shapes") is None
    assert tactic_precision("sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32") == "int8"
    assert tactic_precision("sm80_xmma_fprop_implicit_gemm_f16f16_f16f32_f16_nhwckrsc_nhwc") == "fp16"
    assert tactic_precision("sm80_xmma_fprop_implicit_gemm_tf32f32_tf32f32_f32_nhwckrsc_nhwc") == "fp32"
    assert tactic_precision("__myl_ConvAddRelu_0x1234") is None


# --------------------------------------------------------------------------- flavor, GPU probe, doctor


def test_flavor_detected_by_features(flavor: TensorRTFlavor) -> None:
    if flavor.is_rtx:
        assert flavor.backend == "tensorrt-rtx" and flavor.module_name == "tensorrt_rtx"
        assert not flavor.features.weak_typing_flags and flavor.features.strongly_typed_flag
        assert flavor.features.aot_compute_capabilities and not flavor.features.timing_cache_effective
    assert _full_trt_flavor().kind == "trt10"
    trt11 = types.SimpleNamespace(
        __version__="11.4.0.106", Builder=object, BuilderFlag=types.SimpleNamespace(TF32=1),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=5),
    )
    f11 = flavor_from_module(trt11, "tensorrt")  # type: ignore[arg-type]
    assert f11.kind == "trt11" and f11.backend == "tensorrt" and f11.features.timing_cache_effective


class _FakeDriver:
    """The CUDA driver API through ctypes, as probe_driver() calls it (one H100)."""

    def __init__(self, name: bytes = b"NVIDIA H100 80GB HBM3", cc: tuple[int, int] = (9, 0)) -> None:
        self.name, self.cc = name, cc

    def cuInit(self, flags):  # noqa: N802 - CUDA names
        return 0

    def cuDriverGetVersion(self, ref):  # noqa: N802
        ref._obj.value = 13000
        return 0

    def cuDeviceGetCount(self, ref):  # noqa: N802
        ref._obj.value = 1
        return 0

    def cuDeviceGet(self, ref, i):  # noqa: N802
        ref._obj.value = i
        return 0

    def cuDeviceGetName(self, buf, n, dev):  # noqa: N802
        buf.value = self.name
        return 0

    def cuDeviceGetAttribute(self, ref, attr, dev):  # noqa: N802
        ref._obj.value = {75: self.cc[0], 76: self.cc[1]}[attr]
        return 0

    def cuDeviceTotalMem_v2(self, ref, dev):  # noqa: N802
        ref._obj.value = 80 << 30
        return 0


def test_gpu_probe_and_run_verdicts(flavor: TensorRTFlavor) -> None:
    loaded, version, gpus, error = probe_driver(_FakeDriver())
    assert loaded and version == "13.0" and error is None
    assert gpus == (GpuInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 81920),)
    driver = DriverInfo(loaded, version, gpus, cuda_python="13.0.0", cuda_runtime="13.0")
    hopper = MachineInfo(flavor=flavor, driver=driver)
    ok, why = can_run_on(hopper)
    if flavor.is_rtx:
        assert not ok and "9.0" in why and "--backend tensorrt" in why
    assert can_run_on(MachineInfo(flavor=_full_trt_flavor(), driver=driver))[0]
    no_bindings = dataclasses.replace(driver, cuda_python=None, runtime_error="cuda-python is not installed")
    ok, why = can_run_on(MachineInfo(flavor=_full_trt_flavor(), driver=no_bindings))
    assert not ok and "cuda-python" in why
    assert not can_run_on(MachineInfo(flavor=None, driver=driver))[0]


def test_doctor_reports_truthfully() -> None:
    report = doctor_report()
    text = format_doctor(report)
    assert "ONNX Runtime" in text and "Optuna" in text and report["optuna"]
    assert report["backends"]["onnxruntime"]["run"] is True
    runnable, why = can_run_tensorrt()
    if not runnable:
        assert report["can_run_tensorrt"] == []
        assert "No backend can run a TensorRT engine on this machine" in text
        assert all(not report["backends"][b]["run"] for b in ("tensorrt", "tensorrt-rtx"))
    if report["tensorrt"]["tensorrt-rtx"]["installed"]:
        assert report["backends"]["tensorrt-rtx"]["build"] is True
        assert "tensorrt-rtx" in report["can_build_tensorrt"]
    json.dumps(report)  # JSON-able for `sensisearch doctor --json`


def test_missing_flavor_is_one_line() -> None:
    if detect_flavor("tensorrt") is not None:
        pytest.skip("tensorrt is installed")
    with pytest.raises(SensisearchError) as err:
        make_tensorrt_backend("tensorrt")
    assert "\n" not in str(err.value) and ".[tensorrt]" in str(err.value)


# --------------------------------------------------------------------------- shapes, settings, runtime helpers


def test_parse_shapes() -> None:
    shapes = parse_shapes("input:1x1x32x32/8x1x32x32/64x1x32x32, images:1x3x640x640")
    assert shapes["input"].min == (1, 1, 32, 32) and shapes["input"].opt == (8, 1, 32, 32) and shapes["input"].max == (64, 1, 32, 32)
    assert shapes["images"].min == shapes["images"].max == (1, 3, 640, 640)
    assert parse_shapes(["a:b:1x2/2x2/3x2"])["a:b"].max == (3, 2)
    for bad in ("input", "input:", "input:1x3/2x3", "input:4x3/2x3/8x3", "input:0x3", "input:1xA", "x:1x2,x:1x2", "x:1x2/1x2x3/1x2"):
        with pytest.raises(SensisearchError, match="--shapes"):
            parse_shapes(bad)


def test_resolve_profile() -> None:
    inputs = [("input", (-1, 1, 32, 32))]
    assert resolve_profile(inputs, {}, 4, 32)["input"].to_dict() == {"min": [1, 1, 32, 32], "opt": [4, 1, 32, 32], "max": [32, 1, 32, 32]}
    static = resolve_profile([("images", (1, 3, 640, 640))], {})["images"]
    assert static.min == static.opt == static.max == (1, 3, 640, 640)
    with pytest.raises(SensisearchError, match="dynamic dimensions"):
        resolve_profile([("x", (-1, 3, -1, -1))], {})
    with pytest.raises(SensisearchError, match="no input named"):
        resolve_profile(inputs, parse_shapes("other:1x1"))
    with pytest.raises(SensisearchError, match="fixed to 32"):
        resolve_profile(inputs, parse_shapes("input:1x1x64x64"))
    with pytest.raises(SensisearchError, match="opt-level"):
        BuilderSettings(opt_level=7).validate()
    with pytest.raises(SensisearchError, match="compute-capabilities"):
        BuilderSettings(compute_capabilities=("eight",)).validate()
    with pytest.raises(SensisearchError, match="only TensorRT-RTX"):
        BuilderSettings(compute_capabilities=("8.6",)).validate(_full_trt_flavor())


def test_runtime_helpers() -> None:
    assert batch_chunks(100, 64) == [(0, 64), (64, 100)]
    assert batch_chunks(10, None) == [(0, 10)] and batch_chunks(10, 10) == [(0, 10)]
    settings = LatencySettings(warmup_runs=1, min_runs=5, max_runs=20, min_seconds=0.5)
    assert not enough_samples(4, 10.0, settings) and not enough_samples(10, 0.1, settings)
    assert enough_samples(5, 0.5, settings) and enough_samples(20, 0.0, settings)


def test_backend_interface(flavor: TensorRTFlavor) -> None:
    backend = make_tensorrt_backend(flavor, workspace_mb=512, opt_level=2)
    assert backend.name == flavor.backend and backend.profile is TENSORRT
    caps = backend.capabilities
    assert caps.precisions == (Precision.INT8, Precision.FP16, Precision.FP32) and caps.fp16_compute and caps.artifact_suffix == ".plan"
    described = backend.describe()
    assert described["builder"]["workspace_mb"] == 512 and described["builder"]["opt_level"] == 2
    json.dumps(described)


# --------------------------------------------------------------------------- GPU only


def _gpu_or_skip(flavor: TensorRTFlavor) -> None:
    ok, why = can_run_tensorrt(flavor)
    if not ok:
        pytest.skip(f"needs an NVIDIA GPU that can run {flavor.backend}: {why}")


@pytest.mark.gpu
def test_gpu_build_run_time_digits(flavor: TensorRTFlavor, digits_built: dict) -> None:
    _gpu_or_skip(flavor)
    backend: TensorRTBackend = digits_built["backend"]
    x = _digits_inputs(100, EVAL_PATH)
    for name in ("fp32", "int8"):
        entry = digits_built["built"][name]
        assert entry.result.details["precision_source"].startswith("engine inspector"), entry.result.details.get("inspector_error")
        with backend.load(entry.result.artifact) as runner:
            got = runner.run({"input": x})[0]  # 100 > opt batch; chunked by the profile's max 64
            session = ort.InferenceSession(str(entry.deployable), providers=["CPUExecutionProvider"])
            want = session.run(None, {"input": x})[0]
            assert got.shape == want.shape
            assert float(np.mean(got.argmax(1) == want.argmax(1))) >= 0.97
            stats = runner.measure_latency({"input": x[:1]}, LatencySettings(warmup_runs=20, min_runs=50, max_runs=500, min_seconds=0.2))
            assert stats.runs >= 50 and 0 < stats.median_ms <= stats.p90_ms
            summary = parse_inspector_json(runner.inspect(), digits_built["info"].layer_names)
            assert summary.counts().get(name, 0) >= 1


@pytest.mark.gpu
def test_gpu_int8_accuracy_within_onnxruntime_bound(flavor: TensorRTFlavor, digits_built: dict) -> None:
    """The INT8 engine's Top-1 drop from FP32 is at most ONNX Runtime's drop for the same
    deployable ONNX plus one point."""
    _gpu_or_skip(flavor)
    from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
    from sensisearch.evaluation.classification import ClassificationEvaluator
    from sensisearch.evaluation.datasets import Preprocess, load_images

    info = digits_built["info"]
    data = load_images(EVAL_PATH, info.inputs[0], "--eval-data")
    evaluator = ClassificationEvaluator(data, Preprocess((0.5,), (0.5,)), "input", 64)
    ort_backend = OnnxRuntimeBackend()
    scores = {}
    for name in ("fp32", "int8"):
        entry = digits_built["built"][name]
        build = ort_backend.build(entry.deployable, entry.deployable.parent / "ort")
        with ort_backend.load(build.artifact) as runner:
            scores[f"ort-{name}"] = evaluator.evaluate(runner).value
        with digits_built["backend"].load(entry.result.artifact) as runner:
            scores[f"trt-{name}"] = evaluator.evaluate(runner).value
    ort_drop = scores["ort-fp32"] - scores["ort-int8"]
    trt_drop = scores["ort-fp32"] - scores["trt-int8"]
    assert abs(scores["trt-fp32"] - scores["ort-fp32"]) <= 0.5, scores
    assert trt_drop <= max(ort_drop, 0.0) + 1.0, scores
