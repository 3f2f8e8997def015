"""Which Q/DQ placements make ONNX Runtime's CPU provider run integer kernels, and faster?

Quantizes the bundled digits ResNet (``sensisearch/examples/digits``) with
``onnxruntime.quantization.quantize_static`` (QuantFormat.QDQ, MinMax
calibration on ``calib.npz``) in several placements, then for each variant:

* median latency (ORT_ENABLE_ALL, warm-up, rounds of runs interleaved over all
  variants) at each batch size and thread count, and the speedup over FP32 as a
  paired ratio: per round, FP32's median / the variant's median, reported as the
  median over rounds with its min-max spread;
* how many of the model's Conv/Gemm became integer kernels in the *ORT-optimized*
  graph (``SessionOptions.optimized_model_filepath``), counted by the ORT backend's
  own ``count_kernels``, and the op types present;
* Top-1 on ``eval.npz``.

``sensisearch_ort`` / ``sensisearch_trt`` go through sensisearch's own path: the
study's calibration statistics (min-max over ``calib.npz``, calibrated minimum
included, so the ONNX Runtime profile uses asymmetric uint8 on signed tensors),
one ``plan_placement``, ``emit_deployable_onnx``.

Run:  python benchmarks/ort_qdq_placement.py [--runs 60] [--yolo] [--no-digits] [--variants ...] [--dump VARIANT]

Measured on the project machine (2 cores, AMD EPYC with AVX-512 VNNI, ORT 1.32), on
the current (distorted) digits example, 2,000 eval images; the machine was shared
(load average ~9.5 on 2 cores), so absolute ms are inflated and only the paired
ratios are meaningful:

    python benchmarks/ort_qdq_placement.py --variants trt_inputs_only ort_u8_pc ort_u8_conv_only sensisearch_ort sensisearch_trt --threads 1

variant                  top1 int/flt                      b1 t1                     b32 t1
fp32                    93.70   0/10    0.359 1.00x [1.00-1.00]  41.354 1.00x [1.00-1.00]
trt_inputs_only         93.50   1/9     0.674 0.54x [0.52-0.57]  78.050 0.53x [0.49-0.56]
ort_u8_pc               93.20  10/0     0.157 2.30x [2.00-2.43]  17.377 2.53x [2.28-3.08]
ort_u8_conv_only        93.50  10/0     0.180 2.02x [1.81-2.07]  20.947 1.92x [1.62-2.54]
sensisearch_ort         93.35  10/0     0.162 2.21x [2.06-2.46]  17.428 2.29x [2.19-3.56]
sensisearch_trt         93.45   0/10    0.763 0.47x [0.45-0.54]  80.783 0.52x [0.47-0.58]

The other variants (per-tensor weights, reduce_range, float bias, float weights +
Q->DQ, explicit ReLU, mixed-sign activations, FP16) and ``--yolo`` were last measured
on the first, undistorted digits model with unpaired timings; their tables were
dropped here. Re-run them with this script before quoting a speed figure. What those
runs showed about *which kernels ORT fuses* (not how fast) still holds and shaped
the ONNX Runtime profile:

* Integer kernels only where a Conv/Add/GAP has DQ on every input AND Q on its output.
  DQ->Conv without an output Q (TensorRT style) runs a float FusedConv and re-dequantizes
  the weights every run: slower than FP32 (above: trt_inputs_only 0.54x, sensisearch_trt 0.47x).
* Activations must be uint8 on this build. int8 activations only fuse where ORT's
  s8->u8 rewrite applies (a Q with a single DQ consumer); with fan-out they don't
  (ort_s8_pc fused 4/10 convs on digits, profile_mixed_sign 1/60 on YOLOv5n).
* per-channel vs per-tensor, reduce_range, int32 vs float bias, int8-initializer+DQ vs
  float+Q->DQ weights, explicit vs removed ReLU (u8 zp 0): the same kernels.
* Quantizing the elementwise ops between convs (Add, GAP, Sigmoid/Mul, Concat) too is
  faster than Conv-only Q/DQ (above: ort_u8_pc 2.30x vs ort_u8_conv_only 2.02x at b1).
  On YOLOv5n sensisearch_ort fuses 57/60 convs: the 3 Detect convs keep a float
  output because it feeds the float decode (tests/test_emit.py checks the count).
* FP16 on this CPU = FP32: ORT's optimized graph is the fp32 NCHWc one plus a Cast.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "sensisearch" / "examples" / "digits"
YOLO = Path(os.environ.get("SENSISEARCH_YOLO", ROOT.parent / "shared" / "data" / "yolov5n.onnx"))

sys.path.insert(0, str(ROOT))
from sensisearch.backends.onnxruntime import count_kernels  # noqa: E402  (after the path setup)

# --------------------------------------------------------------------------- data
def load_digits_data():
    import json

    meta = json.loads((DIGITS / "example.json").read_text())
    mean, std = float(meta["mean"][0]), float(meta["std"][0])

    def prep(images):
        return ((images.astype(np.float32) / 255.0 - mean) / std)[:, None]

    c, e = np.load(DIGITS / "calib.npz"), np.load(DIGITS / "eval.npz")
    return prep(c["images"]), prep(e["images"]), e["labels"]


class Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, name: str = "input", batch: int = 1) -> None:
        self._batches = [{name: x[i : i + batch]} for i in range(0, len(x), batch)]
        self._it = iter(self._batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._batches)


# ----------------------------------------------------------------------- variants
ALL = None  # quantize every op type ORT knows
CONV_GEMM = ["Conv", "Gemm", "MatMul"]
S8, U8 = QuantType.QInt8, QuantType.QUInt8

# name -> (description, quantize_static kwargs, post-processing or None)
VARIANTS: dict[str, tuple[str, dict, str | None]] = {
    "trt_inputs_only": (
        "TRT-style: sym s8 act, sym s8 per-ch W, Q/DQ on Conv/Gemm inputs only",
        dict(
            op_types_to_quantize=CONV_GEMM,
            activation_type=S8,
            weight_type=S8,
            per_channel=True,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "OpTypesToExcludeOutputQuantization": CONV_GEMM,
            },
        ),
        None,
    ),
    "trt_inputs_add": (
        "TRT-style + Q/DQ on both Add inputs (Add output float)",
        dict(
            op_types_to_quantize=CONV_GEMM + ["Add"],
            activation_type=S8,
            weight_type=S8,
            per_channel=True,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "OpTypesToExcludeOutputQuantization": CONV_GEMM + ["Add"],
            },
        ),
        None,
    ),
    "ort_u8_pc": (
        "ORT default placement (all ops, Relu folded), u8 asym act, s8 per-ch W",
        dict(op_types_to_quantize=ALL, activation_type=U8, weight_type=S8, per_channel=True),
        None,
    ),
    "ort_u8_pt": (
        "as ort_u8_pc but per-tensor weights",
        dict(op_types_to_quantize=ALL, activation_type=U8, weight_type=S8, per_channel=False),
        None,
    ),
    "ort_u8_pc_rr": (
        "as ort_u8_pc with reduce_range (7-bit weights)",
        dict(op_types_to_quantize=ALL, activation_type=U8, weight_type=S8, per_channel=True, reduce_range=True),
        None,
    ),
    "ort_s8_pc": (
        "ORT default placement, s8 asym act, s8 per-ch W",
        dict(op_types_to_quantize=ALL, activation_type=S8, weight_type=S8, per_channel=True),
        None,
    ),
    "ort_s8sym_pc": (
        "ORT default placement, s8 SYMMETRIC act (Relu kept), s8 per-ch W",
        dict(
            op_types_to_quantize=ALL,
            activation_type=S8,
            weight_type=S8,
            per_channel=True,
            extra_options={"ActivationSymmetric": True},
        ),
        None,
    ),
    "ort_u8_conv_only": (
        "u8 act, Q/DQ on Conv/Gemm inputs+outputs only (Relu/Add/GAP float)",
        dict(op_types_to_quantize=CONV_GEMM, activation_type=U8, weight_type=S8, per_channel=True),
        None,
    ),
    "ort_u8_pc_floatbias": (
        "as ort_u8_pc but bias left float (QuantizeBias=False)",
        dict(
            op_types_to_quantize=ALL,
            activation_type=U8,
            weight_type=S8,
            per_channel=True,
            extra_options={"QuantizeBias": False},
        ),
        None,
    ),
    "ort_u8_pc_wQDQ": (
        "as ort_u8_pc but weights stored float + Q->DQ (not int8 init + DQ)",
        dict(op_types_to_quantize=ALL, activation_type=U8, weight_type=S8, per_channel=True),
        "float_weights_qdq",
    ),
    "ort_u8_pc_keeprelu": (
        "as ort_u8_pc but Relu kept (QDQKeepRemovableActivations)",
        dict(
            op_types_to_quantize=ALL,
            activation_type=U8,
            weight_type=S8,
            per_channel=True,
            extra_options={"QDQKeepRemovableActivations": True},
        ),
        None,
    ),
    "ort_u8_stem_fp32": (
        "as ort_u8_pc but the stem Conv (1 input channel) left FP32",
        dict(
            op_types_to_quantize=ALL,
            activation_type=U8,
            weight_type=S8,
            per_channel=True,
            nodes_to_exclude=["stem/0/Conv"],
        ),
        None,
    ),
    "ort_u8_layer3_only": (
        "mixed precision: only layer3 (3 Conv + Add) INT8, rest FP32",
        dict(
            op_types_to_quantize=ALL,
            activation_type=U8,
            weight_type=S8,
            per_channel=True,
            nodes_to_quantize=["layer3/conv1/Conv", "layer3/conv2/Conv", "layer3/downsample/0/Conv", "layer3/Add"],
        ),
        None,
    ),
    "ort_u8_pc_explicitrelu": (
        "as ort_u8_pc but Relu re-inserted between Conv/Add and the Q (u8, zp=0) after it",
        dict(op_types_to_quantize=ALL, activation_type=U8, weight_type=S8, per_channel=True),
        "explicit_relu",
    ),
    "profile_mixed_sign": (
        "u8 zp=0 on post-ReLU tensors, SYMMETRIC s8 on all other activations (signed tensors)",
        dict(op_types_to_quantize=ALL, activation_type=U8, weight_type=S8, per_channel=True),
        "MIXED_SIGN",  # resolved in make_variant: needs the float model
    ),
    "sensisearch_ort": (
        "sensisearch emitter, ONNXRUNTIME_CPU profile (INT8 regions), all layers INT8, min-max thresholds",
        None,
        "SENSISEARCH:onnxruntime-cpu",
    ),
    "sensisearch_trt": (
        "sensisearch emitter, TENSORRT profile, all layers INT8, min-max thresholds",
        None,
        "SENSISEARCH:tensorrt",
    ),
    "fp16_all": (
        "all weights/activations FP16 (Cast at input/output), no quantization",
        None,
        "to_fp16",
    ),
}


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Whole-model FP16 with a Cast at the graph input and output."""
    g = model.graph
    for init in g.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    inp, out = g.input[0].name, g.output[0].name
    for n in g.node:
        for i, x in enumerate(n.input):
            if x == inp:
                n.input[i] = inp + "_fp16"
        for i, x in enumerate(n.output):
            if x == out:
                n.output[i] = out + "_fp16"
    g.node.insert(0, onnx.helper.make_node("Cast", [inp], [inp + "_fp16"], name="input_cast_fp16", to=onnx.TensorProto.FLOAT16))
    g.node.append(onnx.helper.make_node("Cast", [out + "_fp16"], [out], name="output_cast_fp32", to=onnx.TensorProto.FLOAT))
    del g.value_info[:]
    return model


def float_weights_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite int8-initializer -> DQ weights as float-initializer -> Q -> DQ."""
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        if (
            node.op_type == "DequantizeLinear"
            and node.input[0] in inits
            and inits[node.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        ):
            q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(inits[node.input[1]])
            zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 else 0.0
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if np.ndim(scale) == 1:
                shape[axis] = -1
            w = (q - np.reshape(zp, shape)) * np.reshape(scale, shape)
            fname = node.input[0] + "_float"
            model.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), fname))
            qnode = onnx.helper.make_node(
                "QuantizeLinear",
                [fname, node.input[1]] + list(node.input[2:3]),
                [node.input[0] + "_q"],
                name=node.name + "_wq",
                axis=axis,
            )
            new_nodes.append(qnode)
            node.input[0] = node.input[0] + "_q"
        new_nodes.append(node)
    kept = [i for i in model.graph.initializer if not (i.name + "_float" in {x.name for x in model.graph.initializer})]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model


def explicit_relu(model: onnx.ModelProto) -> onnx.ModelProto:
    """Undo the quantizer's Relu removal: Conv/Add -> Relu -> Q, same Q params (zp 0)."""
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type in ("Conv", "Add") and "Relu_output" in node.output[0]:
            pre = node.output[0] + "_prerelu"
            relu = onnx.helper.make_node("Relu", [pre], [node.output[0]], name=node.output[0] + "_relu")
            node.output[0] = pre
            nodes.append(relu)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def signed_tensor_overrides(model_path: Path) -> dict:
    """TensorQuantOverrides making every activation that is not provably >= 0 symmetric int8."""
    m = onnx.load(str(model_path))
    nonneg: set[str] = set()
    for n in m.graph.node:  # graph is topologically sorted
        if n.op_type == "Relu" or (
            n.op_type in ("GlobalAveragePool", "MaxPool", "Flatten", "Reshape") and n.input[0] in nonneg
        ):
            nonneg.add(n.output[0])
    inits = {i.name for i in m.graph.initializer}
    acts = {x for n in m.graph.node for x in list(n.input) + list(n.output) if x and x not in inits}
    return {t: [{"quant_type": QuantType.QInt8, "symmetric": True}] for t in sorted(acts - nonneg)}


POST = {"explicit_relu": explicit_relu, "float_weights_qdq": float_weights_qdq, "to_fp16": to_fp16}


def sensisearch_variant(src: Path, dst: Path, profile_name: str, calib: np.ndarray, input_name: str) -> None:
    """All-INT8 deployable ONNX from sensisearch's own path: the study's calibration
    statistics over ``calib`` (min-max, with the calibrated minimum that the ONNX Runtime
    profile's asymmetric uint8 uses), one placement, the emitter."""
    sys.path.insert(0, str(ROOT))
    from sensisearch.calibration import collect_statistics
    from sensisearch.model import analyze_model
    from sensisearch.quantize import (
        PROFILES, CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig, emit_deployable_onnx, plan_placement,
        statistics_tensors,
    )
    from sensisearch.calibration.ranges import CalibrationRanges

    info, model = analyze_model(src)
    profile = PROFILES[profile_name]
    config = TrialConfig.uniform(
        info.layer_names, Precision.INT8, CalibrationChoice(CalibrationAlgorithm.MINMAX, samples=len(calib))
    )
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    step = dim0.dim_value if dim0.HasField("dim_value") else 32
    feeds = ({input_name: calib[i : i + step]} for i in range(0, len(calib), step))
    statistics = collect_statistics(src, statistics_tensors(model, info), feeds, [len(calib)])
    placement = plan_placement(info, model, config, profile)
    ranges = CalibrationRanges(statistics).ranges(placement.threshold_tensors, config.calibration)
    onnx.save(emit_deployable_onnx(model, info, placement, ranges, profile), str(dst))


def make_variant(src: Path, dst: Path, name: str, calib: np.ndarray, input_name: str) -> None:
    _, kwargs, post = VARIANTS[name]
    if post and post.startswith("SENSISEARCH:"):
        sensisearch_variant(src, dst, post.split(":", 1)[1], calib, input_name)
        return
    if post == "MIXED_SIGN":
        kwargs = dict(kwargs, extra_options={"TensorQuantOverrides": signed_tensor_overrides(src)})
        post = None
    if kwargs is not None:
        quantize_static(str(src), str(dst), Reader(calib, input_name), quant_format=QuantFormat.QDQ, **kwargs)
    else:
        onnx.save(onnx.load(str(src)), str(dst))
    if post:
        m = POST[post](onnx.load(str(dst)))
        onnx.save(m, str(dst))


# ------------------------------------------------------------------- measurement
def session(path: Path, threads: int, optimized_out: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not ALLOW_SPINNING:  # as sensisearch's OnnxRuntimeBackend sets it
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_out is not None:
        so.optimized_model_filepath = str(optimized_out)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def times_ms(sess: ort.InferenceSession, feed: dict, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def op_census(optimized: Path) -> collections.Counter:
    m = onnx.load(str(optimized))
    return collections.Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}") for n in m.graph.node
    )


def count_weighted(optimized: Path) -> tuple[int, int]:
    """(integer, float) weighted kernels, counted by the ORT backend's own census."""
    counts = count_kernels(onnx.load(str(optimized)))
    return counts["int8"], counts["fp32"] + counts["fp16"]


def top1(path: Path, x: np.ndarray, y: np.ndarray, input_name: str) -> float:
    sess = session(path, threads=2)
    out = np.concatenate([sess.run(None, {input_name: x[i : i + 250]})[0] for i in range(0, len(x), 250)])
    return float((out.argmax(1) == y).mean())


def dump_graph(optimized: Path, out=sys.stdout) -> None:
    m = onnx.load(str(optimized))
    for n in m.graph.node:
        dom = n.domain or "ai.onnx"
        print(f"  {n.name:60s} {dom}:{n.op_type:28s} in={list(n.input)} out={list(n.output)}", file=out)


def run(model: Path, variants: list[str], calib, evalset, input_name: str, batches, threads, runs, workdir: Path,
        rounds: int = 6, warmup: int = 10):
    rng = np.random.default_rng(0)
    shape = onnx.load(str(model)).graph.input[0].type.tensor_type.shape
    chw = [d.dim_value for d in shape.dim[1:]]
    feeds = {b: {input_name: rng.standard_normal([b] + chw).astype(np.float32)} for b in batches}
    if evalset is not None and chw == list(evalset[0].shape[1:]):
        for b in batches:  # real data where we have it
            if b <= len(evalset[0]):
                feeds[b] = {input_name: evalset[0][:b]}
    rows = []
    paths = {"fp32": model}
    for v in variants:
        p = workdir / f"{model.stem}.{v}.onnx"
        make_variant(model, p, v, calib, input_name)
        paths[v] = p
    info = {}
    for v, p in paths.items():
        opt = workdir / f"{p.stem}.opt.onnx"
        session(p, 1, opt)  # writes the optimized model
        census = op_census(opt)
        n_int, n_float = count_weighted(opt)
        acc = top1(p, evalset[0], evalset[1], input_name) if evalset is not None else float("nan")
        info[v] = (acc, n_int, n_float, census)
    # Timing is interleaved (round-robin over variants, `rounds` chunks each) so that load
    # from other processes hits every variant alike. A speedup is paired: per round,
    # median fp32 ms / median variant ms of that round; reported as the median of the
    # per-round ratios with their spread (min-max over rounds).
    lat = {v: {} for v in paths}
    for t in threads:
        sessions = {v: session(p, t) for v, p in paths.items()}
        for b in batches:
            for s in sessions.values():
                for _ in range(warmup):
                    s.run(None, feeds[b])
            per_round = {v: [] for v in paths}
            for _ in range(rounds):
                for v, s in sessions.items():
                    per_round[v].append(float(np.median(times_ms(s, feeds[b], max(1, runs // rounds)))))
            fp32_rounds = np.array(per_round["fp32"])
            for v in paths:
                ratios = fp32_rounds / np.array(per_round[v])
                lat[v][(b, t)] = (float(np.median(per_round[v])), float(np.median(ratios)), float(ratios.min()), float(ratios.max()))
        print(f"... threads={t}: done", file=sys.stderr, flush=True)
    base = lat["fp32"]
    rows = [(v, *info[v][:3], lat[v], info[v][3]) for v in paths]
    return rows, base, paths


def format_table(rows, base, batches, threads) -> str:
    hdr = f"{'variant':22s} {'top1':>6s} {'int/flt':>7s}"
    for b in batches:
        for t in threads:
            hdr += f" {'b' + str(b) + ' t' + str(t):>26s}"
    lines = [hdr]
    for v, acc, n_int, n_float, lat, _ in rows:
        line = f"{v:22s} {acc * 100:6.2f} {n_int:>3d}/{n_float:<3d}"
        for b in batches:
            for t in threads:
                ms, ratio, lo, hi = lat[(b, t)]
                line += f" {ms:7.3f} {ratio:4.2f}x [{lo:4.2f}-{hi:4.2f}]"
        lines.append(line)
    lines.append("")
    lines.append("int/flt = weighted ops (Conv/Gemm/MatMul) running as integer kernels / still float,")
    lines.append("counted in the ORT_ENABLE_ALL-optimized graph as sensisearch's ORT backend counts them.")
    lines.append("Cells: median ms, speedup over fp32 = median of per-round paired ratios [min-max over rounds].")
    lines.append("")
    lines.append("op types in the optimized graphs:")
    for v, *_, census in rows:
        lines.append(f"  {v}: " + ", ".join(f"{k} x{c}" for k, c in sorted(census.items())))
    return "\n".join(lines)


def main(argv=None) -> None:
    logging.getLogger().setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--yolo", action="store_true", help="also time yolov5n (640x640, latency only)")
    ap.add_argument("--no-digits", action="store_true", help="skip the digits model")
    ap.add_argument("--dump", nargs="*", default=[], help="print the ORT-optimized graph of these variants")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--allow-spinning", action="store_true", help="keep ORT's busy-waiting threads (default: off, as the backend)")
    args = ap.parse_args(argv)
    global ALLOW_SPINNING
    ALLOW_SPINNING = args.allow_spinning

    print(
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, cpu count {os.cpu_count()}, "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qdq_placement_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.no_digits:
        calib, ex, ey = load_digits_data()
        rows, base, paths = run(
            DIGITS / "digits_resnet.onnx", args.variants, calib, (ex, ey), "input", args.batches, args.threads,
            args.runs, workdir,
        )
        print(f"\n== digits_resnet (1x32x32), load average now {os.getloadavg()[0]:.2f} ==")
        print(format_table(rows, base, args.batches, args.threads))
        for v in args.dump:
            print(f"\n== ORT-optimized graph of {v} ==")
            dump_graph(workdir / f"{paths[v].stem}.opt.onnx")

    if args.yolo and YOLO.exists():
        m = onnx.load(str(YOLO))
        name = m.graph.input[0].name
        if max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) < 13:
            # per-channel DequantizeLinear (axis attribute) needs opset 13
            from onnx import version_converter

            m = version_converter.convert_version(m, 13)
        y13 = workdir / "yolov5n.onnx"
        onnx.save(m, str(y13))
        coco = YOLO.parent / "coco-dev" / "images"
        if coco.is_dir():  # real letterboxed images (the last 8 of coco-dev)
            sys.path.insert(0, str(ROOT))
            from sensisearch.evaluation.detection import list_images
            from sensisearch.evaluation.tensor_store import TensorStore

            store = TensorStore.build(list_images(coco)[-8:], (640, 640))
            ycal = store.batch(slice(0, len(store)))
        else:
            ycal = np.random.default_rng(0).uniform(0, 1, size=(8, 3, 640, 640)).astype(np.float32)
        yrows, ybase, _ = run(
            y13, [v for v in args.variants if v in YOLO_VARIANTS], ycal, None, name, [1], args.threads,
            max(10, args.runs // 3), workdir,
        )
        print(f"\n== yolov5n (1x3x640x640, random input; latency only; load {os.getloadavg()[0]:.2f}) ==")
        print(format_table(yrows, ybase, [1], args.threads))


YOLO_VARIANTS = [
    "trt_inputs_only",
    "ort_u8_pc",
    "ort_s8_pc",
    "ort_u8_conv_only",
    "profile_mixed_sign",
    "sensisearch_ort",
    "sensisearch_trt",
]
ALLOW_SPINNING = False

if __name__ == "__main__":
    main()
