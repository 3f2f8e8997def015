"""FP32 against FP32: which differences between two sessions bias a paired speed-up?

Times pairs of ONNX Runtime sessions of the same FP32 model (default: the bundled
digits ResNet) against each other with :func:`sensisearch.measure.aa_control`, and
prints the A/A ratio (reference time / other time; > 1: the other ran faster) with
its 95% CI for each variant, twice: plain interleaved timing, and load-aware timing
pinned to free cores (``LoadPolicy``). A variant whose ratio is off 1.00 beyond its
CI (and 2%) is biased: the difference it names would show in every speed-up.

Variants (the reference is always the backend's built artifact, loaded by the backend,
as the study's FP32 reference is, unless the line says otherwise):

- ``study A/A``: a second artifact built and loaded the same way (what trials get);
- ``same file``: a second session of the same artifact;
- ``raw as-is``: the original model loaded with the backend's options (no saved optimization);
- session option changes on the other side only: spinning on, 1 thread, ORT's
  default thread count (0: all physical cores, affinitized), parallel executor,
  no graph optimization (on the artifact, and on the raw model).

    python benchmarks/aa_control.py [--model M.onnx] [--batch 1] [--seconds 4] [--threads N]

Printed, never asserted. Run on a quiet machine for numbers to quote.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sensisearch.backends.onnxruntime import OnnxRuntimeBackend
from sensisearch.measure import (
    LoadPolicy,
    PairedTimingSettings,
    aa_control,
    machine_identity,
)

DIGITS = Path(__file__).resolve().parents[1] / "sensisearch" / "examples" / "digits" / "digits_resnet.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DIGITS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4.0, help="time cap per variant and mode")
    ap.add_argument("--threads", type=int, default=None, help="backend intra-op threads (default: the backend's)")
    args = ap.parse_args()

    ort.set_default_logger_severity(3)  # spinning is set twice on purpose in two variants: no warning
    backend = OnnxRuntimeBackend(threads=args.threads)
    ident = machine_identity()
    print(f"CPU: {ident.cpu_model}, {ident.cpu_count} cores, flags {', '.join(ident.cpu_flags)}; onnxruntime {ort.__version__}; "
          f"backend threads {backend.threads}; model {args.model.name} batch {args.batch}")

    tmp = Path(tempfile.mkdtemp(prefix="aa-control-"))
    artifact = backend.build(args.model, tmp / "reference").artifact
    rebuilt = backend.build(args.model, tmp / "control").artifact
    session = ort.InferenceSession(str(artifact), backend.session_options(), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [args.batch if not isinstance(d, int) else d for d in inp.shape]
    shape[0] = args.batch
    feeds = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    del session

    def options(**changes: object) -> ort.SessionOptions:
        o = backend.session_options()
        spin = changes.pop("spin", None)
        for key, value in changes.items():
            setattr(o, key, value)
        if spin is not None:
            o.add_session_config_entry("session.intra_op.allow_spinning", str(spin))
        return o

    def arm(path: Path, opts: ort.SessionOptions) -> Callable[[], object]:
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in s.get_outputs()]
        fixed = dict(feeds)
        return lambda: s.run(names, fixed)

    NONE = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    base = options
    variants: list[tuple[str, Callable[[], tuple[Callable[[], object], Callable[[], object]]]]] = [
        ("study A/A (artifact vs rebuilt artifact)", lambda: (arm(artifact, base()), arm(rebuilt, base()))),
        ("same file, second session", lambda: (arm(artifact, base()), arm(artifact, base()))),
        ("artifact vs raw model as-is", lambda: (arm(artifact, base()), arm(args.model, base()))),
        ("raw as-is vs raw as-is", lambda: (arm(args.model, base()), arm(args.model, base()))),
        ("other: spinning on", lambda: (arm(artifact, base()), arm(artifact, options(spin=1)))),
        ("both: spinning on", lambda: (arm(artifact, options(spin=1)), arm(artifact, options(spin=1)))),
        ("other: 1 intra-op thread", lambda: (arm(artifact, base()), arm(artifact, options(intra_op_num_threads=1)))),
        ("other: ORT default threads (0)", lambda: (arm(artifact, base()), arm(artifact, options(intra_op_num_threads=0)))),
        ("other: parallel executor", lambda: (arm(artifact, base()), arm(artifact, options(execution_mode=ort.ExecutionMode.ORT_PARALLEL)))),
        ("other: artifact, opt level DISABLE", lambda: (arm(artifact, base()), arm(artifact, options(graph_optimization_level=NONE)))),
        ("other: raw model, opt level DISABLE", lambda: (arm(artifact, base()), arm(args.model, options(graph_optimization_level=NONE)))),
    ]
    settings = PairedTimingSettings(min_rounds=100, max_rounds=20000, max_seconds=args.seconds, target_ci_width=0.01)
    policy = LoadPolicy(needed_cores=backend.threads, max_wait_s=5.0, max_retries=8)
    print(f"\n{'variant':42s} {'plain A/A ratio [95% CI]':>30s}   {'pinned, load-aware [95% CI]':>30s}  load-aware record")
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}")
    for name, make in variants:
        cells = []
        note = ""
        for load in (None, policy):
            ref, other = make()  # fresh sessions per mode (a pinned mode's threads are born pinned)
            r = aa_control(ref, other, settings, load=load)
            flag = "" if r.ok else " BIASED"
            cells.append(f"{r.ratio:.3f} [{r.ci95[0]:.3f}, {r.ci95[1]:.3f}]{flag}")
            if load is not None and r.paired.load_record is not None:
                rec = r.paired.load_record
                note = (f"cores {list(rec.cores)} before={rec.before.verdict if rec.before else '-'} "
                        f"retried={rec.retried_blocks} loaded={rec.loaded_blocks}")
            del ref, other
        print(f"{name:42s} {cells[0]:>30s}   {cells[1]:>30s}  {note}", flush=True)
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
