"""How fast is a COCO mAP evaluation of FP32 YOLOv5n on ONNX Runtime (CPU), and
how much of it is spent outside inference?

Evaluates ``shared/data/yolov5n.onnx`` on the 170 ``coco-dev`` images with
:class:`~sensisearch.evaluation.detection.CocoDetectionEvaluator` and the
``OnnxRuntimeBackend`` runner, with the letterboxed tensor cache warm (it is
built first if needed, and that one-off cost is printed separately). For each
repeat it prints images/s and the time per phase: ``preprocess`` (memory-mapped
uint8 -> float32 /255), ``inference`` (``runner.run``), ``nms`` (decode, NMS,
rescale) and ``cocoeval`` (result json + pycocotools). Goal: the phases other
than inference take <= 25% of the evaluation.

``--no-spinning`` adds a run with ONNX Runtime's intra-op thread spinning turned
off (``session.intra_op.allow_spinning=0``): spinning workers compete with the
Python post-processing between runs on a small machine.

Run:  python benchmarks/detection_eval.py [--repeat 2] [--cache-dir DIR] [--no-spinning]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRunner
from sensisearch.evaluation.detection import CocoDetectionEvaluator
from sensisearch.study import StudySettings
from sensisearch.study import build_evaluation, resolve_inputs

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SENSISEARCH_SHARED_DATA", ROOT.parent / "shared" / "data"))
PHASES = ("preprocess", "inference", "nms", "cocoeval")


def report(label: str, result, wall: float) -> None:
    t = result.timings
    total = sum(t[p] for p in PHASES)
    outside = total - t["inference"]
    print(
        f"{label:<22} {result.count / wall:6.2f} img/s (wall {wall:6.2f}s) | "
        + " ".join(f"{p} {t[p]:6.2f}s" for p in PHASES)
        + f" | outside inference {100 * outside / total:5.1f}% | inference-only {result.count / t['inference']:6.2f} img/s"
        + f" | mAP50-95 {result.metrics['mAP50-95']:.2f} mAP50 {result.metrics['mAP50']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared/data folder")
    parser.add_argument("--cache-dir", type=Path, default=None, help="tensor cache folder (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: the backend's)")
    parser.add_argument("--no-spinning", action="store_true", help="also time a session with thread spinning off")
    args = parser.parse_args()

    model = args.data / "yolov5n.onnx"
    coco = args.data / "coco-dev"
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        # The evaluator exactly as `sensisearch run` builds it from these flags.
        resolved = resolve_inputs(StudySettings.from_flat(model=model, eval_data=coco / "images", annotations=coco / "instances.json", cache_dir=cache))
        evaluator = build_evaluation(resolved.settings, resolved.input_spec, resolved.model, cache, need_calibration=False).evaluator
        assert isinstance(evaluator, CocoDetectionEvaluator)
        t0 = time.perf_counter()
        store = evaluator.store
        print(f"tensor cache: {len(store)} images {store.input_shape} at {store.location} ready in {time.perf_counter() - t0:.2f}s")
        evaluator._store = None  # reopen from disk: later evaluations only memory-map it
        t0 = time.perf_counter()
        _ = evaluator.store
        print(f"tensor cache reopened (memory-map) in {1e3 * (time.perf_counter() - t0):.1f} ms")

        backend = OnnxRuntimeBackend(threads=args.threads)
        print(f"onnxruntime {ort.__version__}, {backend.threads} intra-op threads, {os.cpu_count()} CPUs")
        runners = [("ort default", backend.load(model))]
        if args.no_spinning:
            options = backend.session_options()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            runners.append(("ort spinning off", OnnxRuntimeRunner(session, model)))
        for label, runner in runners:
            feeds = evaluator.latency_feeds(1)
            for _ in range(3):  # warm-up
                runner.run(feeds)
            for i in range(args.repeat):
                t0 = time.perf_counter()
                result = evaluator.evaluate(runner)
                report(f"{label} #{i + 1}", result, time.perf_counter() - t0)
            runner.close()


if __name__ == "__main__":
    main()
