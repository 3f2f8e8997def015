"""One FP32 onnxruntime pass over the calibration data -> per-tensor statistics.

``collect_statistics`` snapshots the running statistics at ascending sample
counts ("checkpoints"), so a trial that calibrates on the first k samples of the
study's deterministic order gets exactly the statistics of those k samples
without another pass. ``StatisticsCache`` persists the result across runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.fileio import atomic_writer

from .histogram import DEFAULT_NBINS, TensorStatistics, update_statistics

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]
StatisticsByCount = dict[int, dict[str, TensorStatistics]]
StatisticsProgress = Callable[[int, int], None]
"""Called after every inference run of the pass with (samples seen, samples the pass needs)."""


def deterministic_order(n: int, seed: int) -> np.ndarray:
    """Permutation of range(n) from ``numpy.random.default_rng(seed)``.

    Calibration sets are prefixes of this order, so the k-sample set is a subset
    of the 2k-sample set and statistics can be snapshotted in one pass.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return np.random.default_rng(seed).permutation(n)


def _batch_size(feed: Feed, index: int) -> int:
    sizes = {int(np.shape(v)[0]) for v in feed.values() if np.ndim(v) >= 1}
    if len(sizes) != 1:
        raise SensisearchError(
            f"calibration batch {index}: inputs disagree on the batch size (axis 0): {sorted(sizes)}; "
            "every input must carry the same number of samples"
        )
    return sizes.pop()


def _slice_feed(feed: Feed, start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: (np.asarray(v)[start:stop] if np.ndim(v) >= 1 else np.asarray(v)) for k, v in feed.items()}


def _augmented_model_bytes(model_path: Path, tensors: Sequence[str]) -> tuple[bytes, set[str]]:
    """Serialized copy of the model with ``tensors`` as extra graph outputs.

    Returns the bytes and the subset of ``tensors`` that are graph inputs (those
    are read from the feed instead). Like ORT's calibrate.py we only append
    outputs; a name-only ValueInfo is enough for onnxruntime, which avoids
    depending on shape inference succeeding.
    """
    import onnx  # local: importing onnx is slow and only needed here

    try:
        model = onnx.load(str(model_path))  # a fresh proto: the caller's is never touched
    except FileNotFoundError:
        raise SensisearchError(f"model file {model_path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad user file
        raise SensisearchError(f"cannot load ONNX model {model_path}: {exc}") from None

    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input} - initializers
    produced = {o for node in graph.node for o in node.output if o}
    existing_outputs = {o.name for o in graph.output}
    from_feed: set[str] = set()
    for name in tensors:
        if name in graph_inputs:
            from_feed.add(name)
        elif name in initializers:
            raise SensisearchError(f"tensor {name!r} in {model_path} is an initializer (a weight), not an activation")
        elif name not in produced:
            raise SensisearchError(f"tensor {name!r} is not produced by any node of {model_path}")
        elif name not in existing_outputs:
            graph.output.append(onnx.ValueInfoProto(name=name))
            existing_outputs.add(name)
    return model.SerializeToString(), from_feed


def _static_batch(session) -> int | None:  # noqa: ANN001 - onnxruntime.InferenceSession
    """The fixed batch of the model inputs, if any input has an integer axis 0."""
    fixed = {d[0] for d in (i.shape for i in session.get_inputs()) if d and isinstance(d[0], int) and d[0] > 0}
    if len(fixed) > 1:
        raise SensisearchError(f"model inputs have different fixed batch sizes {sorted(fixed)}")
    return fixed.pop() if fixed else None


class _Collector:
    """Running state of one collection pass (kept out of the public API)."""

    def __init__(self, tensors: Sequence[str], checkpoints: Sequence[int], nbins: int) -> None:
        self.tensors = list(tensors)
        self.pending = list(checkpoints)
        self.nbins = nbins
        self.seen = 0
        self.stats: dict[str, TensorStatistics | None] = {t: None for t in self.tensors}
        self.result: StatisticsByCount = {}

    @property
    def done(self) -> bool:
        return not self.pending

    def next_checkpoint_inside(self, n: int) -> int | None:
        """Offset within the next n samples where a checkpoint falls, if strictly inside."""
        if self.pending and self.seen < self.pending[0] < self.seen + n:
            return self.pending[0] - self.seen
        return None

    def consume(self, outputs: Mapping[str, np.ndarray], n: int) -> None:
        """Update with the outputs of n samples, splitting at checkpoints on axis 0."""
        cut = self.next_checkpoint_inside(n)
        if cut is not None:
            for name, value in outputs.items():
                if np.ndim(value) == 0 or np.shape(value)[0] != n:
                    raise SensisearchError(
                        f"calibration checkpoint {self.pending[0]} falls inside a fixed-size batch of {n} and tensor "
                        f"{name!r} (shape {np.shape(value)}) has no batch axis 0 to split; "
                        f"use checkpoints that are multiples of {n}"
                    )
            self.consume({k: v[:cut] for k, v in outputs.items()}, cut)
            self.consume({k: v[cut:] for k, v in outputs.items()}, n - cut)
            return
        for name in self.tensors:
            value = outputs[name]
            if not np.issubdtype(np.asarray(value).dtype, np.floating):
                raise SensisearchError(
                    f"tensor {name!r} has dtype {np.asarray(value).dtype}; only floating-point activations can be calibrated"
                )
            self.stats[name] = update_statistics(self.stats[name], value, self.nbins)
        self.seen += n
        while self.pending and self.seen >= self.pending[0]:
            count = self.pending.pop(0)
            # TensorStatistics are immutable, so a snapshot is a shallow copy.
            self.result[count] = dict(self.stats)  # type: ignore[arg-type]
            logger.info("calibration statistics: snapshot at %d samples", count)


def collect_statistics(
    model_path: Path,
    tensors: Sequence[str],
    batches: Iterable[Feed],
    checkpoints: Sequence[int],
    intra_op_threads: int = 0,
    nbins: int = DEFAULT_NBINS,
    progress: StatisticsProgress | None = None,
) -> StatisticsByCount:
    """Run the FP32 model once and return ``{k: {tensor: statistics of first k samples}}``.

    * ``batches`` are consumed in order; each is a feed ``{input name: array}``
      whose axis 0 is the sample axis. Iteration stops once the last checkpoint
      is reached (later batches are never pulled).
    * If a checkpoint falls inside a batch, the batch's INPUTS are split there and
      run as two parts (exact for any output layout, e.g. tensors whose axis 0 is
      not the batch). With a fixed model batch B (e.g. YOLOv5 [1,3,640,640]),
      batches are first cut into runs of B samples, and a checkpoint inside a run
      of B > 1 is handled by splitting the outputs along axis 0.
    * If the data ends before some checkpoints, those are absent and the final
      statistics are returned under the total sample count (logged as a warning);
      :class:`~sensisearch.calibration.thresholds.ThresholdTable` resolves larger
      requests to it.
    * Graph optimisation level is ORT_ENABLE_BASIC (constant folding and
      redundant-node removal: numerically neutral), not the extended fusions
      that can change float results.
    * ``progress(seen, total)`` is called after every inference run (``total``
      is the last checkpoint; ``seen`` may stop short of it when the data ends).
    """
    import onnxruntime as ort

    model_path = Path(model_path)
    tensors = list(dict.fromkeys(tensors))
    if not tensors:
        raise ValueError("collect_statistics needs at least one tensor")
    ckpts = [int(c) for c in checkpoints]
    if not ckpts or any(c <= 0 for c in ckpts) or any(b <= a for a, b in zip(ckpts, ckpts[1:])):
        raise SensisearchError(f"calibration sample counts must be positive and strictly ascending, got {list(checkpoints)}")

    model_bytes, from_feed = _augmented_model_bytes(model_path, tensors)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = int(intra_op_threads)
    try:
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several types for a graph it cannot load
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SensisearchError(
            f"{model_path}: ONNX Runtime cannot load the model for calibration ({first_line}); "
            "check that the model runs in onnxruntime"
        ) from None
    static_batch = _static_batch(session)
    fetch = [t for t in tensors if t not in from_feed]

    collector = _Collector(tensors, ckpts, nbins)
    started = time.perf_counter()

    def run(feed: Feed, n: int, batch_index: int) -> None:
        outputs: dict[str, np.ndarray] = {}
        if fetch:
            try:
                values = session.run(fetch, dict(feed))
            except Exception as exc:  # noqa: BLE001 - ORT raises for feeds that do not fit the model
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SensisearchError(
                    f"running {model_path.name} on calibration batch {batch_index} failed: {first_line}"
                ) from None
            outputs.update(zip(fetch, values))
        for name in from_feed:
            outputs[name] = np.asarray(feed[name])
        collector.consume(outputs, n)
        if progress is not None:
            progress(min(collector.seen, ckpts[-1]), ckpts[-1])

    batch_index = -1
    for batch_index, feed in enumerate(batches):
        n = _batch_size(feed, batch_index)
        if static_batch is not None:
            if n % static_batch:
                raise SensisearchError(
                    f"calibration batch {batch_index} has {n} samples but {model_path.name} has a fixed batch of "
                    f"{static_batch}; provide a multiple of {static_batch}"
                )
            for start in range(0, n, static_batch):
                run(_slice_feed(feed, start, start + static_batch) if n != static_batch else feed, static_batch, batch_index)
                if collector.done:
                    break
        else:
            start = 0
            while start < n and not collector.done:
                cut = collector.next_checkpoint_inside(n - start)
                stop = start + cut if cut is not None else n
                part = feed if (start == 0 and stop == n) else _slice_feed(feed, start, stop)
                run(part, stop - start, batch_index)
                start = stop
        logger.debug("calibration batch %d: %d samples so far", batch_index, collector.seen)
        if collector.done:
            break

    if collector.seen == 0:
        raise SensisearchError(f"no calibration samples were provided for {model_path.name}")
    if collector.pending:
        logger.warning(
            "calibration data has only %d samples; sample counts %s are not available, using %d instead",
            collector.seen, collector.pending, collector.seen,
        )
        collector.result.setdefault(collector.seen, dict(collector.stats))  # type: ignore[arg-type]
    final = collector.result[max(collector.result)]
    for name, st in final.items():
        if st.nonfinite:
            logger.warning("tensor %r: %d non-finite values ignored by calibration", name, st.nonfinite)
    logger.info(
        "collected statistics of %d tensors over %d samples in %.1f s",
        len(tensors), collector.seen, time.perf_counter() - started,
    )
    return collector.result


class StatisticsCache:
    """Directory of ``stats-<key>.npz`` files, one per (model, data, checkpoints, nbins).

    Writes are atomic (temporary file in the same directory, fsync, os.replace),
    so a crash leaves either the old file or none. A file that is unreadable,
    truncated (zip CRC/structure check), of another format version or key, or
    internally inconsistent is treated as a cache MISS: ``load`` logs a warning
    and returns None, and the next ``save`` overwrites it.
    """

    FORMAT_VERSION = 1

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def key(
        cls,
        model_sha256: str,
        data_fingerprint: str,
        checkpoints: Sequence[int],
        nbins: int = DEFAULT_NBINS,
        tensors: Sequence[str] = (),
    ) -> str:
        """Hex key; also covers the cache format and the onnxruntime version
        (its kernels produce the activations). ``tensors`` optionally pins the set."""
        import onnxruntime as ort

        payload = {
            "format": cls.FORMAT_VERSION,
            "model": model_sha256,
            "data": data_fingerprint,
            "checkpoints": [int(c) for c in checkpoints],
            "nbins": int(nbins),
            "tensors": sorted(tensors),
            "onnxruntime": ort.__version__,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"stats-{key}.npz"

    def save(self, key: str, stats: Mapping[int, Mapping[str, TensorStatistics]]) -> Path:
        counts_keys = sorted(int(k) for k in stats)
        if not counts_keys:
            raise ValueError("nothing to save")
        names = list(stats[counts_keys[0]])
        arrays: dict[str, np.ndarray] = {}
        for si, k in enumerate(counts_keys):
            per_tensor = stats[k]
            if list(per_tensor) != names:
                raise ValueError("every sample count must hold the same tensors in the same order")
            arrays[f"s{si}_counts"] = np.stack([per_tensor[t].counts for t in names]).astype(np.int64)
            arrays[f"s{si}_scalars"] = np.array(
                [[per_tensor[t].min, per_tensor[t].max, per_tensor[t].bin_width] for t in names], dtype=np.float64
            ).reshape(len(names), 3)
            arrays[f"s{si}_nonfinite"] = np.array([per_tensor[t].nonfinite for t in names], dtype=np.int64)
        meta = {"format": self.FORMAT_VERSION, "key": key, "sample_counts": counts_keys, "tensors": names}
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        with atomic_writer(final) as f:
            np.savez(f, **arrays)
        logger.info("saved calibration statistics to %s", final)
        return final

    def load(self, key: str) -> StatisticsByCount | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return self._read(path, key)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning("ignoring unreadable calibration cache %s (%s: %s)", path, type(exc).__name__, exc)
            return None

    def _read(self, path: Path, key: str) -> StatisticsByCount:
        with np.load(path, allow_pickle=False) as data:
            # Reading a member fully verifies its zip CRC, so truncation/bit rot raises.
            meta = json.loads(bytes(data["__meta__"]).decode())
            if meta.get("format") != self.FORMAT_VERSION or meta.get("key") != key:
                raise ValueError("format version or key mismatch")
            names = list(meta["tensors"])
            result: StatisticsByCount = {}
            for si, k in enumerate(meta["sample_counts"]):
                counts = data[f"s{si}_counts"]
                scalars = data[f"s{si}_scalars"]
                nonfinite = data[f"s{si}_nonfinite"]
                if counts.ndim != 2 or counts.shape[0] != len(names) or scalars.shape != (len(names), 3):
                    raise ValueError("inconsistent array shapes")
                if nonfinite.shape != (len(names),) or (counts < 0).any() or (scalars[:, 2] < 0).any():
                    raise ValueError("invalid statistics values")
                result[int(k)] = {
                    name: TensorStatistics(
                        min=float(scalars[ti, 0]),
                        max=float(scalars[ti, 1]),
                        counts=counts[ti].copy(),
                        bin_width=float(scalars[ti, 2]),
                        nonfinite=int(nonfinite[ti]),
                    )
                    for ti, name in enumerate(names)
                }
        return result
