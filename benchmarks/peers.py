"""The default study next to its peers: NNCF's accuracy control and ModelOpt's all-INT8, on the same inputs.

Same model (YOLOv5n, or its opset-13 conversion with ``--opset13``: per-channel
weight quantization, NNCF's better operating point), same calibration images,
same evaluation images, same scorer (sensisearch's own COCO evaluator through
its public API, on ONNX Runtime with the TensorRT Q/DQ profile's graph), same
``--max-drop``. Prints, side by side, INT8 convs, drop, wall time and validation
calls (full-set evaluations; the study's subset probes count as their share).

- **sensisearch**: ``sensisearch run`` with no search flags (the guided study);
  its wall time includes preparation and the sensitivity probes.
- **NNCF** ``quantize_with_accuracy_control`` (``pip install .[peers]``): its
  ``validation_fn`` scores the images NNCF asks for with the same evaluator.
  Its ONNX graphs quantize non-negative tensors (the input image, YOLO's box
  decoding) as uint8, which TensorRT cannot run; the ", int8" row is the same
  answer with those quantizers made int8 over the same range, as TensorRT could
  deploy it (NNCF 3.4 refuses to force signed activations on this model).
- **ModelOpt** ``python -m modelopt.onnx.quantization`` (entropy and max
  calibration): all-INT8 only; its drop on the same images.

Every answer is scored again with per-image results: its drop gets a 95% paired
bootstrap CI (FP32 and the answer resampled alike), and each sensisearch answer's
drop minus each peer's gets one too, on the evaluation images and on held-out
images no tool saw. A difference whose CI holds 0 is one these images cannot
tell. The all-FP16 row is the control: rounding that loses nothing measurable
still moves mAP on tens of images, and its drop shows by how much.
``--tensors`` prints each answer's SQNR against FP32 at every Conv output.

The peers are slow (NNCF: 13-34 min on a quiet 2-core machine with the full set),
so their results are cached in ``--cache`` (JSON keyed by everything they depend
on); ``--rerun-peers`` measures them again. Wall times depend on the machine's
load: say which load they were taken under. Figures are printed, never asserted.

    python benchmarks/peers.py --quick              # 40 eval, 32 calibration images, budget 50
    python benchmarks/peers.py                      # 85 eval, 85 calibration images, budget 50
    python benchmarks/peers.py --opset13            # the per-channel operating point
    python benchmarks/peers.py --quick --opset13 --their-floats   # NNCF's float choice, our quantizer
    python benchmarks/peers.py --quick --opset13 --tensors        # SQNR of every Conv output, answer by answer
    python benchmarks/peers.py --quick --opset13 --holdout 40     # the study confirms its answer on 40 more images
    python benchmarks/peers.py --quick --opset13 --holdout 40 --reserve-only   # its control, same final images
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx

from sensisearch.evaluation.base import EvaluationResult
from sensisearch.measure import PairedBootstrap, accuracy_points, map50_95_points, map50_points, within_noise

SHARED = Path(os.environ.get("SENSISEARCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
log = logging.getLogger("peers")


@dataclass
class PeerResult:
    """One row of the table."""

    name: str
    int8_convs: int
    convs: int
    metric: float
    fp32: float
    seconds: float
    validation_calls: float
    note: str = ""
    held_out_drop: float | None = None
    """FP32 minus this answer's metric on the held-out images (neither searched on nor calibrated on)."""
    drop_ci: list[float] | None = None
    """95% paired bootstrap CI of :attr:`drop` over the evaluation images (images resampled alike for FP32 and the answer)."""
    held_out_ci: list[float] | None = None
    """The same for :attr:`held_out_drop`."""
    found_s: float | None = None
    """Seconds from the start of the study's run to the end of the trial that found this answer (the study's wall
    time had it stopped there); a peer that stops itself has only :attr:`seconds`."""
    model_path: str = ""
    """The answer's ONNX file (the held-out scoring reads it)."""

    @property
    def drop(self) -> float:
        return self.fp32 - self.metric


# --------------------------------------------------------------------------- inputs
def held_out_annotations(coco: Path, out: Path, eval_images: int, calib_images: int) -> Path:
    """An annotation file of the images no tool saw: not among the evaluation images every answer was picked on
    (the first ``eval_images`` of the first half) nor among the calibration images (the first ``calib_images`` of
    the second half). Each tool chose its answer on the evaluation images, so its drop there is optimistic;
    scored here, the answers show whether they generalise."""
    data = json.loads((coco / "instances.json").read_text())
    names = [im["file_name"] for im in data["images"]]
    half = len(names) // 2
    keep = set(names[eval_images:half] + names[half + calib_images:])
    images = [im for im in data["images"] if im["file_name"] in keep]
    ids = {im["id"] for im in images}
    path = out / f"held-out-{eval_images}e-{calib_images}c.json"
    path.write_text(json.dumps(dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])))
    return path


def split_coco(coco: Path, out: Path, eval_images: int, calib_images: int) -> tuple[Path, Path]:
    """Calibration and evaluation images that share none: the second half of the annotation file's images
    calibrates (its first ``calib_images``), the first half evaluates (``eval_images`` via --eval-limit)."""
    data = json.loads((coco / "instances.json").read_text())
    names = [im["file_name"] for im in data["images"]]
    half = len(names) // 2
    calib = out / f"calib-{calib_images}"
    calib.mkdir(parents=True, exist_ok=True)
    for name in names[half:half + calib_images]:
        link = calib / Path(name).name
        if not link.exists():
            link.symlink_to((coco / "images" / name).resolve())
    return coco / "images", calib


def opset13(model_path: Path, out: Path) -> Path:
    """The model converted to opset 13 (onnx's version converter): per-channel QuantizeLinear axes become legal."""
    target = out / f"{model_path.stem}-opset13.onnx"
    if not target.is_file():
        from onnx import version_converter

        converted = version_converter.convert_version(onnx.load(str(model_path)), 13)
        onnx.checker.check_model(converted)
        onnx.save(converted, str(target))
    return target


def int8_convs(model: onnx.ModelProto) -> tuple[int, int]:
    """(Conv nodes whose weight comes through a DequantizeLinear, all Conv nodes)."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return len(convs) - len(float_convs(model)), len(convs)


def float_convs(model: onnx.ModelProto) -> set[str]:
    """Names of the Conv nodes whose weight does not come through a DequantizeLinear: those kept in float."""
    produced_by = {o: n for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "Conv"
            and not (len(n.input) > 1 and getattr(produced_by.get(n.input[1]), "op_type", "") == "DequantizeLinear")}


def their_floats(ctx: Any, held_out_ctx: Any, model: Path, peer: PeerResult) -> None:
    """Prints the peer's choice of float convs quantized by sensisearch, under every calibration the study offers.

    Tells a peer's better search (its choice of float layers wins with our quantizer too)
    from its better quantized graph (placement, calibration, bias correction: it does not).
    """
    from sensisearch.quantize.config import CalibrationChoice, Precision, TrialConfig

    floats = float_convs(onnx.load(peer.model_path))
    layers = [layer.name for layer in ctx.info.layers]
    float_precision = Precision.FP16 if Precision.FP16 in ctx.space.precisions else Precision.FP32
    search, held = Scorer(ctx), Scorer(held_out_ctx)
    fp32 = (search(model), held(model))
    print(f"\n{peer.name}'s float convs ({', '.join(sorted(floats)) or 'none'}), the rest INT8, quantized by sensisearch"
          f" ({float_precision.value} floats; drop = FP32 - metric):")
    for algorithm in ctx.space.algorithms:
        for bias in ctx.space.bias_correction:
            calibration = CalibrationChoice(algorithm, max(ctx.space.sample_counts), ctx.space.default_calibration.percentile, bias)
            config = TrialConfig({n: float_precision if n in floats else Precision.INT8 for n in layers}, calibration)
            path = deployable(ctx, config, f"their-floats-{algorithm.value}{'-bias' if bias else ''}")
            print(f"  {algorithm.value:<11} bias correction {'on ' if bias else 'off'}  search drop {fp32[0] - search(path):+.2f}"
                  f"  held-out drop {fp32[1] - held(path):+.2f}", flush=True)


def conv_sqnr(rows: Sequence[PeerResult], ctx: Any, model: Path, images: int = 8) -> None:
    """Prints, for every answer, the SQNR (dB) of every Conv output and of the model's outputs against FP32 on
    ``images`` evaluation images: where, tensor by tensor, one quantized graph departs from FP32 more than another.
    Errors accumulate, so the first Conv at which two columns part is where their quantizers differ."""
    import onnxruntime as ort

    fp32_model = onnx.load(str(model))
    tensors = [(n.name, n.output[0]) for n in fp32_model.graph.node if n.op_type == "Conv"]
    tensors += [(o.name, o.name) for o in fp32_model.graph.output]
    input_name = ctx.evaluation.calibration.input_name
    batches = [search_batch(ctx, i) for i in np.linspace(0, (ctx.evaluator.image_count() or 1) - 1, images).astype(int)]

    def outputs(path: Path) -> dict[str, np.ndarray]:
        graph = onnx.load(str(path))
        present = {o for node in graph.graph.node for o in node.output}
        names = [t for _, t in tensors if t in present or t in {o.name for o in graph.graph.output}]
        listed = {o.name for o in graph.graph.output}
        # Each tensor as the graph types it (ModelOpt's graphs compute in FP16 between its Q/DQ), FP32 where not inferred.
        inferred = onnx.shape_inference.infer_shapes(graph)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.type.tensor_type.elem_type}
        graph.graph.output.extend(onnx.helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None)
                                  for t in names if t not in listed)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as named
        session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        runs = [session.run(names, {input_name: b}) for b in batches]
        return {t: np.concatenate([r[k] for r in runs]).astype(np.float64) for k, t in enumerate(names)}

    reference = outputs(model)
    columns = [(r.name.strip()[:16], outputs(Path(r.model_path))) for r in rows if r.model_path and Path(r.model_path).is_file()]
    print(f"\nSQNR against FP32 (dB, higher is closer) on {len(batches)} evaluation images, every Conv output then the model outputs:")
    print(f"{'tensor':<34}" + "".join(f"{name:>17}" for name, _ in columns))
    for label, t in tensors:
        cells = []
        for _, out in columns:
            if t not in out:
                cells.append(f"{'-':>17}")
                continue
            noise = float(np.sum((reference[t] - out[t]) ** 2))
            cells.append(f"{10 * np.log10(float(np.sum(reference[t] ** 2)) / max(noise, 1e-30)):>17.1f}")
        print(f"{label[-34:]:<34}" + "".join(cells))


def search_batch(ctx: Any, position: int) -> np.ndarray:
    """The preprocessed input of the search image at ``position`` (of the study's search images: with --holdout its
    evaluator is a subset of the evaluation images, :class:`~sensisearch.evaluation.base.ImageSubset`)."""
    evaluator = ctx.evaluator
    inner = getattr(evaluator, "inner", evaluator)
    to_inner = getattr(evaluator, "positions", None)
    return inner.store.batch([int(position if to_inner is None else to_inner[position])])


class Scorer:
    """Scores any ONNX file with the study's own evaluator and backend, counting full-set-equivalent calls."""

    def __init__(self, ctx: Any, evaluator: Any = None) -> None:
        self.ctx = ctx
        self.evaluator = evaluator or ctx.evaluator
        """The study's search images by default; the held-out ones for :class:`HeldOutCheck`."""
        self.calls = 0.0
        self.total = self.evaluator.image_count() or 1

    @contextlib.contextmanager
    def _runner(self, path: Path) -> Iterator[Any]:
        """``path`` built and loaded by the study's backend, in a throwaway folder."""
        with tempfile.TemporaryDirectory(prefix="peers-score-") as tmp:
            build = self.ctx.backend.build(path, Path(tmp))
            with self.ctx.backend.load(build.artifact) as runner:
                yield runner

    def result(self, path: Path) -> EvaluationResult:
        """The full evaluation of ``path``, per-image results included (for paired CIs)."""
        self.calls += 1
        with self._runner(path) as runner:
            return self.evaluator.evaluate(runner)

    def __call__(self, path: Path, positions: Sequence[int] | None = None) -> float:
        if positions is None or len(positions) >= self.total:
            return float(self.result(path).value)
        self.calls += len(positions) / self.total
        with self._runner(path) as runner:
            return float(self.evaluator.evaluate_part(runner, np.sort(np.asarray(positions, np.int64))).result.value)


def calibration_array(ctx: Any) -> np.ndarray:
    """The study's calibration inputs, preprocessed exactly as its statistics pass sees them."""
    source = ctx.evaluation.calibration
    return np.concatenate(list(source.batches(list(range(source.size)), 1)), axis=0).astype(np.float32)


# --------------------------------------------------------------------------- sensisearch
Point = tuple[int, float, str, Any, "float | None", int]
"""An evaluated configuration of the study: INT8 convs, metric, label, config, found at s, trial number."""


class HeldOutCheck:
    """The study's own held-out images (``--holdout``): an answer counts only if it does not clearly fail there
    (its held-out drop CI wholly above ``--max-drop``), as the product's winner must not. The product scores FP32,
    the baselines, its front and its winner (``score_holdout``, what ``write_results`` runs); the benchmark's picks
    (most INT8 convs within ``--max-drop``) are scored in turn until one holds, by the same rule
    (:meth:`~sensisearch.study.store._record.HoldoutScore.fails`), and that time and those calls are the study's too."""

    def __init__(self, ctx: Any, study: Any, max_drop: float, model: Path) -> None:
        from sensisearch.study import DROP_RESAMPLE_FACTOR, records, score_holdout

        self.ctx, self.max_drop = ctx, max_drop
        self.seconds, self.calls = 0.0, 0.0
        self.scores: dict[int, Any] = {}
        self.scorer = None if ctx.evaluation.holdout is None else Scorer(ctx, ctx.evaluation.holdout)
        if self.scorer is None:
            return
        started = time.monotonic()
        score_holdout(ctx, study)
        self.scores = {r.number: r.holdout for r in records(study) if r.holdout is not None}
        # FP32's per-image results on the held-out images, for the CIs of the picks the product did not score,
        # with as many resamples as the product's (verify's DROP_RESAMPLE_FACTOR x --drop-resamples).
        self.reference = self.scorer.result(model)
        self.bootstrap = PairedBootstrap(self.reference.per_image, metric_points(self.reference.metric),
                                         int(DROP_RESAMPLE_FACTOR * ctx.settings.measurement.drop_resamples))
        self.calls = (len(self.scores) + 1) * self.scorer.total / (ctx.evaluator.image_count() or 1)
        self.seconds = time.monotonic() - started

    def passes(self, number: int, config: Any) -> bool:
        from sensisearch.study import HoldoutScore

        if self.scorer is None:
            return True
        if number not in self.scores:
            started = time.monotonic()
            result = self.scorer.result(deployable(self.ctx, config, f"trial-{number}"))
            estimate = self.bootstrap.drop(result.per_image)
            self.scores[number] = HoldoutScore(result.value, self.reference.value, result.count, estimate.ci95)
            self.calls += self.scorer.total / (self.ctx.evaluator.image_count() or 1)
            self.seconds += time.monotonic() - started
        return not self.scores[number].fails(self.max_drop)

    def note(self, number: int) -> str:
        score = self.scores.get(number)
        if score is None:
            return ""
        ci = "" if score.drop_ci95 is None else f" [{score.drop_ci95[0]:+.2f}, {score.drop_ci95[1]:+.2f}]"
        return f", study's held-out drop {score.drop:+.2f}{ci}"

    def first_passing(self, ranked: Sequence[Point]) -> Point | None:
        return next((p for p in ranked if self.passes(p[5], p[3])), None)


def run_study(settings: Any) -> tuple[PeerResult, Any, list[Point], HeldOutCheck]:
    from sensisearch.study import prepare, records, run_study as run
    from sensisearch.study import PROBE_COST_ATTR
    from sensisearch.quantize.config import Precision

    started, started_at = time.monotonic(), datetime.datetime.now()
    ctx = prepare(settings)
    study = run(ctx)
    seconds = time.monotonic() - started
    check = HeldOutCheck(ctx, study, settings.acceptance.max_drop, Path(settings.data.model))
    rows = records(study)
    # When each trial ended, counted from the start of the run: the study's answer at that moment. A peer that
    # stops itself (NNCF) is compared with the time our answer took to appear, beside the whole budget's time.
    found = {t.number: (t.datetime_complete - started_at).total_seconds() for t in study.trials if t.datetime_complete}
    fp32 = next(r.value for r in rows if r.baseline == "fp32")
    convs = sum(1 for layer in ctx.info.layers if layer.op_type == "Conv")
    feasible = [r for r in rows if r.value is not None and fp32 - r.value <= settings.acceptance.max_drop]

    def int8_of(r: Any) -> int:
        return sum(1 for layer in ctx.info.layers if layer.op_type == "Conv" and r.config.precisions.get(layer.name) == Precision.INT8)

    evaluated = sum(1 for r in rows if r.value is not None and r.role == "evaluate")
    probe_cost = float((study.user_attrs.get(PROBE_COST_ATTR) or {}).get("trials", 0.0))
    # Every evaluated configuration (INT8 convs, metric, label): the table also reads the study at a peer's INT8 count.
    points: list[Point] = [(int8_of(r), float(r.value), f"trial {r.number}, {r.config.calibration.algorithm.value}", r.config,
                            found.get(r.number), r.number) for r in rows if r.value is not None and r.baseline != "fp32"]
    # The most INT8 convs within --max-drop (and, with --holdout, within it on the study's held-out images too).
    ranked = sorted((p for p in points if fp32 - p[1] <= settings.acceptance.max_drop), key=lambda p: (p[0], p[1]), reverse=True)
    best = check.first_passing(ranked) or ranked[0]
    q, metric, label, config, found_s, number = best
    return PeerResult("sensisearch (default study)", q, convs, metric, fp32, seconds, evaluated + probe_cost,
                      label + check.note(number), model_path=str(deployable(ctx, config, f"trial-{number}")),
                      found_s=found_s), ctx, points, check


def deployable(ctx: Any, config: Any, name: str) -> Path:
    """The study's deployable Q/DQ ONNX of ``config`` (what a trial built), written again for the held-out scoring."""
    folder = ctx.out / "peers-answers" / name
    folder.mkdir(parents=True, exist_ok=True)
    path, _ = ctx.pipeline.emit(config, folder)
    return Path(path)


def at_peer_count(
    ctx: Any, study_row: PeerResult, points: Sequence[Point], peer: PeerResult, check: HeldOutCheck
) -> PeerResult | None:
    """The study's best configuration with at least as many INT8 convs as ``peer`` (same run, same wall time):
    the comparison the peer's own operating point asks for (with --holdout: the best that holds on the study's
    held-out images)."""
    eligible = sorted((p for p in points if p[0] >= peer.int8_convs), key=lambda p: (p[1], p[0]), reverse=True)
    if not eligible or peer.convs == 0:
        return None
    q, metric, label, config, found_s, number = check.first_passing(eligible) or eligible[0]
    return dataclasses.replace(study_row, name=f"  sensisearch at >= {peer.int8_convs} INT8", int8_convs=q, metric=metric,
                               note=label + check.note(number), model_path=str(deployable(ctx, config, f"trial-{number}")),
                               found_s=found_s)


def fp16_control(ctx: Any, fp32: float) -> PeerResult | None:
    """All layers FP16 (TensorRT's lossless-in-practice baseline), scored like the answers: its drop is the
    scorer's floor, what rounding that loses nothing measurable already does to mAP on these images."""
    from sensisearch.quantize.config import Precision

    if Precision.FP16 not in ctx.space.precisions:
        return None
    path = deployable(ctx, ctx.space.uniform(Precision.FP16), "all-fp16")
    return PeerResult("all-FP16 (control)", 0, len([x for x in ctx.info.layers if x.op_type == "Conv"]),
                      Scorer(ctx)(path), fp32, 0.0, 1.0, "rounding only", model_path=str(path))


CALIBRATION_ROW = "all-INT8 {} (control)"
REFERENCE_CALIBRATION = "mse"


def calibration_rows(ctx: Any, fp32: float) -> list[PeerResult]:
    """All-INT8 under every calibration the study offers (with and without bias correction when it offers both):
    how each one generalises from the images the study picks on to images it never saw. Each is paired with
    all-INT8 MSE on the same images (:func:`paired_drops`): a calibration that loses there only by the search
    images' noise is one the study should not be able to pick."""
    import dataclasses

    from sensisearch.quantize.config import Precision, TrialConfig

    base = ctx.space.default_calibration
    corrections = sorted(set(ctx.space.bias_correction))
    convs = len([x for x in ctx.info.layers if x.op_type == "Conv"])
    rows = []
    for algorithm in ctx.space.algorithms:
        for corrected in corrections:
            choice = dataclasses.replace(base, algorithm=algorithm, bias_correction=corrected)
            label = algorithm.value + (" + bias correction" if corrected else "")
            config = TrialConfig.uniform(list(ctx.space.layers), Precision.INT8, choice)
            path = deployable(ctx, config, "all-int8-" + label.replace(" ", "-").replace("+", "bc"))
            rows.append(PeerResult(CALIBRATION_ROW.format(label), convs, convs, Scorer(ctx)(path), fp32, 0.0, 1.0,
                                   f"{choice.samples} samples", model_path=str(path)))
    return rows


# --------------------------------------------------------------------------- NNCF
def run_nncf(ctx: Any, model_path: Path, max_drop: float, work: Path, name: str) -> PeerResult:
    """NNCF's answer, saved as ``work/<name>.onnx`` (``name`` from its cache key: a run on other images or another
    model must not overwrite the file a cached row points to)."""
    import nncf

    scorer = Scorer(ctx)
    input_name = ctx.evaluation.calibration.input_name
    calib = calibration_array(ctx)
    started = time.monotonic()
    fp32 = scorer(model_path)
    scorer.calls = 0.0

    def validate(model: onnx.ModelProto, items: Any) -> float:
        positions = [int(i) for i in items]
        path = work / "nncf-candidate.onnx"
        onnx.save(model, str(path))
        return scorer(path, positions)

    positions = list(range(scorer.total))
    quantized = nncf.quantize_with_accuracy_control(
        onnx.load(str(model_path)),
        calibration_dataset=nncf.Dataset(list(range(len(calib))), lambda i: {input_name: calib[i:i + 1]}),
        validation_dataset=nncf.Dataset(positions, lambda i: {input_name: search_batch(ctx, i)}),
        validation_fn=validate,
        max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calib),
    )
    seconds = time.monotonic() - started
    path = work / f"{name}.onnx"
    onnx.save(quantized, str(path))
    calls = scorer.calls
    metric = scorer(path)
    q, total = int8_convs(quantized)
    return PeerResult(f"NNCF {nncf.__version__} accuracy control", q, total, metric, fp32, seconds, calls,
                      "uint8 where non-negative", model_path=str(path))


def as_tensorrt_deployable(peer: PeerResult, ctx: Any, work: Path) -> PeerResult | None:
    """``peer``'s answer as TensorRT could run it: NNCF quantizes non-negative tensors (the input image, YOLO's box
    decoding) as uint8, and TensorRT's Q/DQ are signed (UINT8 "cannot be used to represent quantized floating-point
    values"). Each uint8 quantizer with zero point 0 becomes int8 over the same range (scale x 255/127): what a
    TensorRT user of this answer deploys. Same search, same wall time; only the graph's integer type changes.
    None when the answer has no such quantizer (it is deployable as it is)."""
    model = onnx.load(peer.model_path)
    inits = {i.name: i for i in model.graph.initializer}
    changed: set[str] = set()
    retyped: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        zero = onnx.numpy_helper.to_array(inits[node.input[2]])
        if zero.dtype != np.uint8 or np.any(zero != 0) or node.input[1] not in inits or node.input[2] in changed:
            continue
        scale = onnx.numpy_helper.to_array(inits[node.input[1]])
        # Shared by the DequantizeLinear that reads this quantizer's output, so both change together.
        inits[node.input[1]].CopyFrom(onnx.numpy_helper.from_array((scale * (255.0 / 127.0)).astype(scale.dtype), node.input[1]))
        inits[node.input[2]].CopyFrom(onnx.numpy_helper.from_array(zero.astype(np.int8), node.input[2]))
        changed.add(node.input[2])
        retyped.update((node.output[0], node.input[2]))
    if not changed:
        return None
    for info in model.graph.value_info:  # the declared types of the quantized tensor and its zero point follow
        if info.name in retyped:
            info.type.tensor_type.elem_type = onnx.TensorProto.INT8
    path = work / (Path(peer.model_path).stem + "-int8.onnx")
    onnx.save(model, str(path))
    return dataclasses.replace(peer, name=f"{peer.name}, int8", metric=Scorer(ctx)(path), model_path=str(path),
                               note=f"{len(changed)} uint8 quantizers made int8 (TensorRT-deployable)")


# --------------------------------------------------------------------------- ModelOpt
def run_modelopt(ctx: Any, model_path: Path, method: str, work: Path, python: str, name: str) -> PeerResult:
    scorer = Scorer(ctx)
    fp32 = scorer(model_path)
    calib_path = work / "calib.npy"
    np.save(calib_path, calibration_array(ctx))
    out = work / f"{name}.onnx"
    # ModelOpt rewrites the file it is given (it saved its preprocessed graph over the input): a private copy.
    private = work / f"modelopt-{method}-input.onnx"
    shutil.copyfile(model_path, private)
    started = time.monotonic()
    done = subprocess.run(
        [python, "-m", "modelopt.onnx.quantization", "--onnx_path", str(private), "--quantize_mode", "int8",
         "--calibration_data_path", str(calib_path), "--calibration_method", method, "--output_path", str(out),
         "--calibration_eps", "cpu"],
        capture_output=True, text=True,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return PeerResult(f"ModelOpt {method}", 0, 0, float("nan"), fp32, seconds, 0, f"failed: {tail[0][:120]}")
    quantized = onnx.load(str(out))
    q, total = int8_convs(quantized)
    return PeerResult(f"ModelOpt {method} (all-INT8)", q, total, scorer(out), fp32, seconds, 1, model_path=str(out))


# --------------------------------------------------------------------------- cache and table
def cache_key(digest: str, args: argparse.Namespace, peer: str) -> str:
    key = {"model": digest, "eval": args.eval_images, "calib": args.calib_images, "max_drop": args.max_drop, "peer": peer}
    if args.holdout and not args.reserve_only:  # the search images are drawn from more images, so they are other images
        key["holdout"] = args.holdout
        if args.seed:  # the study's seed draws them
            key["seed"] = args.seed
    return json.dumps(key, sort_keys=True)


def answer_name(peer: str, key: str) -> str:
    """The file stem of a peer's answer: one file per cache entry."""
    return f"{peer}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def cached(cache: dict[str, Any], key: str, rerun: bool, measure: Callable[[], PeerResult], path: Path) -> PeerResult:
    if not rerun and key in cache:
        return PeerResult(**cache[key])
    result = measure()
    cache[key] = asdict(result)
    path.write_text(json.dumps(cache, indent=1))
    return result


def paired_drops(rows: Sequence[PeerResult], ctx: Any, model: Path, held_out: bool, resamples: int) -> tuple[float, list[str]]:
    """Scores every row's answer on ``ctx``'s images with per-image results: its drop's paired bootstrap CI
    against FP32 (``drop_ci``, or ``held_out_drop``/``held_out_ci`` on the held-out images) and the paired
    difference between each answer and every peer's on the same images and resamples.

    A 0.5-point gap on tens of images is often within noise: one image's near-tie detections swap ranks
    after a perturbation far below the quantization error (measured: 0.04 logit on three head biases moved
    mAP on 138 images by 0.6). So the verdicts read the CIs, not the point values.
    Returns FP32's metric on these images and the lines of the difference table."""
    scorer = Scorer(ctx)
    fp32 = scorer.result(model)
    metric_fn = metric_points(fp32.metric)
    against_fp32 = PairedBootstrap(fp32.per_image, metric_fn, resamples)
    results: dict[str, EvaluationResult] = {}
    for r in rows:
        if not (r.model_path and Path(r.model_path).is_file()):
            continue
        results[r.name] = scorer.result(Path(r.model_path))
        estimate = against_fp32.drop(results[r.name].per_image)
        if held_out:
            r.held_out_drop, r.held_out_ci = estimate.drop, list(estimate.ci95)
        else:
            r.drop_ci = list(estimate.ci95)
    lines = []
    calibrations = [r for r in rows if r.name.startswith("all-INT8 ") and r.name in results]
    reference = CALIBRATION_ROW.format(REFERENCE_CALIBRATION)
    if reference in results:  # each calibration against all-INT8 MSE on the same images and resamples
        against_reference = PairedBootstrap(results[reference].per_image, metric_fn, resamples)
        for r in [r for r in calibrations if r.name != reference]:
            d = against_reference.drop(results[r.name].per_image)
            verdict = "within noise" if within_noise(d.ci95) else (f"{REFERENCE_CALIBRATION} better" if d.drop > 0 else "better")
            lines.append(f"  {r.name:<34} minus {reference:<30} {d.drop:+.2f} [{d.ci95[0]:+.2f}, {d.ci95[1]:+.2f}]  {verdict}")
    for peer in [r for r in rows if not r.name.lstrip().startswith("sensisearch") and r.name in results
                 and r not in calibrations]:
        against_peer = PairedBootstrap(results[peer.name].per_image, metric_fn, resamples)
        for r in [r for r in rows if r.name.lstrip().startswith("sensisearch") and r.name in results]:
            d = against_peer.drop(results[r.name].per_image)
            verdict = "within noise" if within_noise(d.ci95) else (f"{peer.name} better" if d.drop > 0 else "sensisearch better")
            lines.append(f"  {r.name.strip():<34} minus {peer.name:<30} {d.drop:+.2f} [{d.ci95[0]:+.2f}, {d.ci95[1]:+.2f}]  {verdict}")
    return float(fp32.value), lines


def metric_points(metric: str) -> Callable[..., float]:
    """The per-image metric function (points) of ``metric``, for paired bootstraps."""
    return {"mAP50-95": map50_95_points, "mAP50": map50_points}.get(metric, accuracy_points)


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def print_table(rows: Sequence[PeerResult], load: str, held_out: tuple[int, float] | None = None,
                differences: Sequence[str] = ()) -> None:
    print(f"\n{'':<38} {'INT8 convs':>11} {'FP32':>7} {'metric':>7} {'drop':>7} {'95% CI':>16} {'held-out':>9} "
          f"{'95% CI':>16} {'wall s':>8} {'found at s':>10} {'val. calls':>11}  note")
    for r in rows:
        other = "n/a" if r.held_out_drop is None else f"{r.held_out_drop:+.2f}"
        found = "" if r.found_s is None else f"{r.found_s:.0f}"
        print(f"{r.name:<38} {f'{r.int8_convs}/{r.convs}':>11} {r.fp32:>7.2f} {r.metric:>7.2f} {r.drop:>+7.2f} {_ci(r.drop_ci):>16} "
              f"{other:>9} {_ci(r.held_out_ci):>16} {r.seconds:>8.0f} {found:>10} {r.validation_calls:>11.1f}  {r.note}")
    if held_out is not None:
        print(f"(held-out: drop on {held_out[0]} images neither searched on nor calibrated on; FP32 there {held_out[1]:.2f})")
    print("(drop = FP32 - metric; 95% CI: paired bootstrap over images, FP32 and the answer resampled alike;"
          " found at: seconds into the study's run when the trial that found the answer ended)")
    if differences:
        print("paired difference of drops, each answer minus the peer's (CI holding 0: these images cannot tell them apart):")
        print("\n".join(differences))
    print(f"(wall times on this machine under load {load}; only comparable within one table)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 eval images, 32 calibration images: minutes on a quiet machine")
    parser.add_argument("--opset13", action="store_true", help="the model converted to opset 13 (per-channel weights)")
    parser.add_argument("--max-drop", type=float, default=0.5, help="points of mAP (both sides)")
    parser.add_argument("--budget", type=int, default=None, help="the study's --budget (default 50, the probes included)")
    parser.add_argument("--eval-images", type=int, default=None)
    parser.add_argument("--holdout", type=int, default=0,
                        help="the study's --holdout: this many more evaluation images, the search runs on --eval-images of "
                             "them (so do the peers) and the study confirms its answer on the rest; the table's held-out "
                             "images are fewer by as many")
    parser.add_argument("--seed", type=int, default=0,
                        help="the study's --seed (its sampler and, with --holdout, which images it holds out): "
                             "repeat a comparison over seeds to see how much of a difference is one draw")
    parser.add_argument("--reserve-only", action="store_true",
                        help="with --holdout: keep those images out of the table's held-out set but do not give them to "
                             "the study (no confirmation): the control run, scored on the same held-out images")
    parser.add_argument("--calib-images", type=int, default=None)
    parser.add_argument("--peers", default="nncf,modelopt", help="comma list of nncf, modelopt (empty: the study only)")
    parser.add_argument("--skip-study", action="store_true", help="peers only (from the cache where it has them)")
    parser.add_argument("--no-held-out", action="store_true", help="skip scoring every answer on the held-out images")
    parser.add_argument("--rerun-peers", action="store_true", help="measure the peers again instead of reading --cache")
    parser.add_argument("--tensors", action="store_true",
                        help="also print every answer's SQNR against FP32 at each Conv output (where the graphs part)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the paired CIs")
    parser.add_argument("--calibrations", action="store_true",
                        help="also score all-INT8 under every calibration the study offers (control rows), each paired "
                             "with all-INT8 MSE: which calibrations generalise from the search images")
    parser.add_argument("--their-floats", action="store_true",
                        help="also score NNCF's choice of float convs quantized by sensisearch (search or quantizer?)")
    parser.add_argument("--modelopt-python", default=os.environ.get("MODELOPT_PYTHON", sys.executable),
                        help="python that has nvidia-modelopt (default: this one)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sensisearch-peers")
    parser.add_argument("--cache", type=Path, default=None, help="peer results JSON (default OUT/peers.json)")
    args = parser.parse_args()
    quick = args.quick
    args.eval_images = args.eval_images or (40 if quick else 85)
    args.calib_images = args.calib_images or (32 if quick else 85)
    budget = args.budget or 50
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from sensisearch.quantize.config import CalibrationAlgorithm
    from sensisearch.study import StudySettings, prepare

    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.cache or args.out / "peers.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    model = SHARED / "yolov5n.onnx"
    if args.opset13:
        model = opset13(model, args.out)
    # Peers get copies: a shared model file must never be rewritten (ModelOpt writes over its input).
    original = model
    model = args.out / model.name
    if not model.is_file() or model.read_bytes() != original.read_bytes():
        shutil.copyfile(original, model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:16]
    # --holdout: the study's evaluation images are --eval-images search images plus the held-out ones.
    study_images = args.eval_images + args.holdout
    confirm = args.holdout if args.holdout and not args.reserve_only else 0
    eval_dir, calib_dir = split_coco(SHARED / "coco-dev", args.out / "split", study_images, args.calib_images)
    tag = f"{model.stem}-{args.eval_images}e-{args.calib_images}c-b{budget}" + (f"-h{args.holdout}" if confirm else "") + (
        f"-s{args.seed}" if args.seed else "")
    def study_settings(**changes: Any) -> StudySettings:
        flat: dict[str, Any] = dict(
            model=model, eval_data=eval_dir, annotations=SHARED / "coco-dev" / "instances.json", calib_data=calib_dir,
            out=args.out / f"study-{tag}", eval_limit=args.eval_images + confirm, holdout=confirm or None, backend="onnxruntime",
            profile="tensorrt",
            sample_counts=[args.calib_images], max_drop=args.max_drop, budget=budget, verify=False, isolation="none", seed=args.seed,
            algorithms=[CalibrationAlgorithm.MINMAX, CalibrationAlgorithm.ENTROPY, CalibrationAlgorithm.PERCENTILE,
                        CalibrationAlgorithm.MSE],
        )
        return StudySettings.from_flat(**{**flat, **changes})

    settings = study_settings()
    rows: list[PeerResult] = []
    ctx = None
    if not args.skip_study:
        shutil.rmtree(settings.storage.out, ignore_errors=True)  # a fresh study: its wall time is the whole run
        study_row, ctx, points, check = run_study(settings)
        rows.append(study_row)
    peers = [p for p in args.peers.split(",") if p]
    if (peers or args.calibrations) and ctx is None:
        # Only the evaluator, backend and calibration inputs: no sensitivity probes for the peers' scorer.
        # Its own folder: a stored study there holds other search settings. Bias correction offered, as the study does.
        ctx = prepare(study_settings(sampler="tpe", search="full", bias_correction="search", out=args.out / f"peers-scorer-{tag}"))
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    for peer in peers:
        if peer == "nncf":
            key = cache_key(digest, args, "nncf")
            rows.append(cached(cache, key, args.rerun_peers,
                               lambda: run_nncf(ctx, model, args.max_drop, work, answer_name("nncf", key)), cache_path))
            deployable_peer = as_tensorrt_deployable(rows[-1], ctx, work) if Path(rows[-1].model_path).is_file() else None
            if deployable_peer is not None:
                rows.append(deployable_peer)
        elif peer == "modelopt":
            for method in ("entropy", "max"):
                key = cache_key(digest, args, f"modelopt-{method}")
                rows.append(cached(cache, key, args.rerun_peers,
                                   lambda m=method, k=key: run_modelopt(ctx, model, m, work, args.modelopt_python,
                                                                        answer_name(f"modelopt-{m}", k)), cache_path))
        else:
            raise SystemExit(f"--peers {peer}: use nncf and/or modelopt")
    if not args.skip_study:
        for peer_row in [r for r in rows[1:] if r.name.startswith("NNCF")]:
            extra = at_peer_count(ctx, rows[0], points, peer_row, check)
            if extra is not None and extra.name not in {r.name for r in rows}:  # one row per INT8 count
                rows.insert(1, extra)
        for r in rows:  # the held-out check is the study's time and calls (the product runs it before its results)
            if r.name.lstrip().startswith("sensisearch"):
                r.seconds += check.seconds
                r.validation_calls += check.calls
    if ctx is None:
        raise SystemExit("nothing to compare: --skip-study with no --peers")
    control = fp16_control(ctx, rows[0].fp32) if rows else None
    if control is not None:
        rows.append(control)
    if args.calibrations:
        rows += calibration_rows(ctx, rows[0].fp32 if rows else Scorer(ctx)(model))
    resamples = args.resamples
    _, differences = paired_drops(rows, ctx, model, held_out=False, resamples=resamples)
    held_out = None
    if study_images + args.calib_images >= 170 and not args.no_held_out:
        print("no held-out images: coco-dev's 170 are all evaluation or calibration images (use fewer of either)")
    elif not args.no_held_out:
        annotations = held_out_annotations(SHARED / "coco-dev", args.out / "split", study_images, args.calib_images)
        held_out_ctx = prepare(study_settings(annotations=annotations, eval_limit=None, holdout=None,
                                              out=args.out / f"held-out-{study_images}e", sampler="tpe", search="full"))
        held_fp32, held_differences = paired_drops(rows, held_out_ctx, model, held_out=True, resamples=resamples)
        held_out = (held_out_ctx.evaluator.image_count() or 0, held_fp32)
        differences = [f" on the {args.eval_images} evaluation images:", *differences,
                       f" on the {held_out[0]} held-out images:", *held_differences]
    print(f"\n{model.name}; {args.eval_images} evaluation images"
          + (f" (+ {confirm} the study holds out to confirm its answer)" if confirm else "")
          + (f" ({args.holdout} more kept out of the held-out set, unused)" if args.holdout and not confirm else "")
          + f", {args.calib_images} calibration images; "
          f"--max-drop {args.max_drop}; study budget {budget}")
    print_table(rows, " ".join(f"{x:.1f}" for x in os.getloadavg()), held_out, differences)
    if args.tensors:
        conv_sqnr(rows, ctx, model)
    if args.their_floats:
        if held_out is None:
            raise SystemExit("--their-floats needs the held-out images (drop --no-held-out, use fewer images)")
        for peer_row in [r for r in rows if r.name.startswith("NNCF") and not r.name.endswith(", int8")
                         and r.model_path and Path(r.model_path).is_file()]:
            their_floats(ctx, held_out_ctx, model, peer_row)


if __name__ == "__main__":
    main()
